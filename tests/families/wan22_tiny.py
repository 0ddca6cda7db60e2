"""The tiny random Wan 2.2 pipelines of scripts/make_tiny_wan22.py, for tests (the script is
not a package module, so it is loaded from its file)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from tests.cli_helpers import REPO


def tiny_wan22_script():
    """scripts/make_tiny_wan22.py as a module (``KINDS``, ``tiny_wan22_pipeline``, ``write_tiny_wan22``)."""
    spec = importlib.util.spec_from_file_location("make_tiny_wan22", REPO / "scripts/make_tiny_wan22.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_tiny_wan22(folder: Path, kind: str, seed: int = 0) -> Path:
    """The tiny pipeline folder of ``kind`` (``t2v-a14b``, ``i2v-a14b``, ``ti2v-5b``) written to ``folder``."""
    return tiny_wan22_script().write_tiny_wan22(folder, kind, seed)
