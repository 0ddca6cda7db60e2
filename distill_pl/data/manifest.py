"""JSONL manifests of captioned videos.

One JSON object per line: ``{"path": "clips/a.mp4", "caption": "a dog running"}``, optionally
with the clip's precomputed control videos by name, ``"controls": {"depth": "depth/a.mp4"}``
(read with the data setting ``control: video``, ``control_key: depth``; see
:mod:`distill_pl.data.control_videos`), and the conditioning image an image-to-video model is
given instead of the clip's first frame, ``"image": "images/a.png"`` (read with ``control:
clip``; see :mod:`distill_pl.data.condition_images`). A relative path is relative to the manifest's folder;
absolute paths are accepted. Blank lines are ignored. ``write_manifest`` writes paths relative
to the manifest's folder.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from distill_pl.data.condition_images import IMAGE_KEY
from distill_pl.util.media import atomic_write


@dataclass(frozen=True)
class ManifestEntry:
    """A video file (absolute, normalised path), its caption, its control videos by name and
    its conditioning image (None: the clip's first frame) (absolute, normalised paths)."""

    path: Path
    caption: str
    controls: dict[str, Path] = field(default_factory=dict)
    image: Path | None = None


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
            controls = record.get("controls", {})
            if not isinstance(controls, dict) or not all(isinstance(v, str) and v for v in controls.values()):
                raise ValueError(f"{where}: 'controls' must map names to video paths, e.g. {{\"depth\": \"depth/a.mp4\"}}")
            image = record.get(IMAGE_KEY)
            if image is not None and not (isinstance(image, str) and image):
                raise ValueError(f"{where}: '{IMAGE_KEY}' must be an image path, e.g. \"images/a.png\"")
            entries.append(ManifestEntry(_absolute(manifest, record["path"]), record["caption"],
                                         {name: _absolute(manifest, path) for name, path in controls.items()},
                                         None if image is None else _absolute(manifest, image)))
    if not entries:
        raise ValueError(f"manifest {manifest} has no entries")
    return entries


def _absolute(manifest: Path, path: str) -> Path:
    """``path`` of a manifest line as an absolute, normalised path (relative: to the manifest's folder)."""
    return Path(os.path.normpath(manifest.parent / Path(path).expanduser()))


def write_manifest(path: str | Path, entries: list[ManifestEntry]) -> Path:
    """Write ``entries`` to ``path`` atomically (temp file + rename); return the path."""
    manifest = Path(os.path.abspath(Path(path).expanduser()))
    relative = lambda path: os.path.relpath(path, manifest.parent)  # noqa: E731
    lines = [
        json.dumps(
            {"path": relative(e.path), "caption": e.caption,
             **({"controls": {name: relative(p) for name, p in e.controls.items()}} if e.controls else {}),
             **({IMAGE_KEY: relative(e.image)} if e.image is not None else {})},
            ensure_ascii=False,
        )
        + "\n"
        for e in entries
    ]
    with atomic_write(manifest) as tmp:
        tmp.write_text("".join(lines), encoding="utf-8")
    return manifest
