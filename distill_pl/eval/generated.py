"""Generated evaluation videos on disk, so an interrupted evaluation resumes per method.

One safetensors file per method: ``videos`` [E, 3, T, H, W] float16 in [-1, 1] and, in the
metadata, the settings and model fingerprint they were made with, the measured seconds
of each generation batch and the generation pass they were timed in. Files are written atomically (temp file, rename); a file whose
settings differ from the current run's is regenerated.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from distill_pl.util.media import atomic_write

KEY = "distill_pl_eval"


def save_videos(path: Path, videos: Tensor, settings: dict, batch_seconds: list[float], timing_run: str = "") -> None:
    """``timing_run`` names the generation pass the batches were timed in."""
    meta = {"settings": settings, "batch_seconds": batch_seconds, "timing_run": timing_run}
    with atomic_write(path) as temp:
        save_file({"videos": videos.detach().cpu().half().contiguous()}, str(temp),
                  metadata={KEY: json.dumps(meta, sort_keys=True)})


def load_videos(path: Path, settings: dict) -> tuple[Tensor, list[float], str] | None:
    """(videos float32, batch seconds, timing run) if ``path`` holds videos made with ``settings``."""
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get(KEY, "{}"))
            if meta.get("settings") != json.loads(json.dumps(settings, sort_keys=True)):
                return None
            return (f.get_tensor("videos").float(), [float(s) for s in meta["batch_seconds"]],
                    str(meta.get("timing_run", "")))
    except Exception as err:  # a damaged file is regenerated, not trusted
        print(f"{path}: unreadable ({type(err).__name__}: {err}); generating again")
        return None
