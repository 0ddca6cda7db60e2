#!/usr/bin/env bash
# Create .venv (if missing) and install distill_pl with its test extra.
# torch is installed as torch==2.13.0 only where no torch is importable, so pip never
# resolves a bare `torch` (which would pull several GB of CUDA wheels).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${DISTILL_PL_VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"
"$PY" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
    "$PY" -m pip install -q "torch==2.13.0"
fi
"$PY" -m pip install -q -e ".[test]"
# LitData, the optional streaming engine (distill_pl/data/streaming.py). --no-deps: litdata
# lists torchvision as a requirement but imports it only for image/video serialisers, which
# distill_pl never uses, and a PyPI torchvision does not import beside this CPU torch; the
# second line installs the requirements litdata really imports.
if ! "$PY" -c "import litdata" >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-deps "litdata==0.2.76"
    "$PY" -m pip install -q boto3 tifffile obstore filelock
fi
echo "distill_pl installed in $VENV"
