"""sha256 fingerprints of files and folders (read in 16 MiB chunks, never whole)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Iterable

CHUNK = 1 << 24


def _update(digest, path: str | Path) -> None:
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            digest.update(chunk)


def file_sha256(path: str | Path) -> str:
    """sha256 hex digest of a file's bytes."""
    digest = hashlib.sha256()
    _update(digest, path)
    return digest.hexdigest()


def named_files_sha256(files: Iterable[tuple[str, Path]]) -> str:
    """sha256 hex digest of ``(name, file)`` pairs in the given order: each name (UTF-8, then a
    NUL byte) followed by the file's bytes. Equal names and contents, equal fingerprint."""
    digest = hashlib.sha256()
    for name, path in files:
        digest.update(name.encode() + b"\0")
        _update(digest, path)
    return digest.hexdigest()
