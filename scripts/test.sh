#!/usr/bin/env bash
# Set up the environment and run the default (fast) test suite, spread over the machine's
# cores by pytest-xdist (-n auto: one worker per core; --dist loadscope keeps a test file on
# one worker, so its module-scoped fixtures are built once; extra arguments go to pytest).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q -n auto --dist loadscope "$@"
