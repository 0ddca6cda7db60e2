"""JSONL manifests of captioned videos.

One JSON object per line: ``{"path": "clips/a.mp4", "caption": "a dog running"}``. A relative
``path`` is relative to the manifest's folder; absolute paths are accepted. Blank lines are
ignored. ``write_manifest`` writes paths relative to the manifest's folder.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from distill_pl.util.media import atomic_write


@dataclass(frozen=True)
class ManifestEntry:
    """A video file (absolute, normalised path) and its caption."""

    path: Path
    caption: str


def read_manifest(path: str | Path) -> list[ManifestEntry]:
    """Entries of the manifest at ``path``; ValueError naming the file and line for bad content."""
    manifest = Path(os.path.abspath(Path(path).expanduser()))
    if not manifest.is_file():
        raise FileNotFoundError(f"manifest {manifest} does not exist")
    entries = []
    with open(manifest, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"manifest {manifest}, line {lineno}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{where}: invalid JSON ({err.msg})") from err
            if not isinstance(record, dict):
                raise ValueError(f"{where}: expected a JSON object with 'path' and 'caption'")
            for key in ("path", "caption"):
                if not isinstance(record.get(key), str):
                    raise ValueError(f"{where}: missing or non-string key '{key}'")
            if not record["path"]:
                raise ValueError(f"{where}: empty 'path'")
            video = manifest.parent / Path(record["path"]).expanduser()
            entries.append(ManifestEntry(Path(os.path.normpath(video)), record["caption"]))
    if not entries:
        raise ValueError(f"manifest {manifest} has no entries")
    return entries


def write_manifest(path: str | Path, entries: list[ManifestEntry]) -> Path:
    """Write ``entries`` to ``path`` atomically (temp file + rename); return the path."""
    manifest = Path(os.path.abspath(Path(path).expanduser()))
    lines = [
        json.dumps(
            {"path": os.path.relpath(e.path, manifest.parent), "caption": e.caption},
            ensure_ascii=False,
        )
        + "\n"
        for e in entries
    ]
    with atomic_write(manifest) as tmp:
        tmp.write_text("".join(lines), encoding="utf-8")
    return manifest
