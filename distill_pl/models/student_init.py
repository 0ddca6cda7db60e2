"""Initialise a student from a diffusers folder or from a KD/DMD2 Lightning checkpoint.

Checkpoint convention of the distillation modules: the student's weights are stored under
``student.`` and, when EMA is on, the averaged weights under ``student_ema.module.``; the
teacher is never stored.
"""

from __future__ import annotations

from pathlib import Path

import torch

from distill_pl.models.denoiser import Denoiser
from distill_pl.models.loading import ModelFolderError
from distill_pl.util.paths import resolve_path

STUDENT_PREFIX = "student."
EMA_PREFIX = "student_ema.module."


def student_state_from_checkpoint(path: str | Path, use_ema: bool = True) -> dict[str, torch.Tensor]:
    """The student's state_dict from a Lightning checkpoint (loaded with weights_only=True).

    Prefers the EMA weights when ``use_ema`` and they exist.
    """
    path = Path(path)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"{path}: cannot read checkpoint ({type(err).__name__}: {err})") from None
    state = checkpoint.get("state_dict") if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict):
        raise ValueError(f"{path}: not a Lightning checkpoint (no state_dict)")
    for prefix in ((EMA_PREFIX, STUDENT_PREFIX) if use_ema else (STUDENT_PREFIX,)):
        picked = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if picked:
            return picked
    raise ValueError(
        f"{path}: no student weights (keys '{STUDENT_PREFIX}*'); is it a KD or DMD2 checkpoint?"
    )


def load_student_weights(student: Denoiser, path: str, use_ema: bool = True) -> str:
    """Load ``path`` (a ``.ckpt`` of a distillation run, or a diffusers folder holding
    ``transformer/`` or a model folder) into ``student``. Returns a description of the source."""
    resolved = resolve_path(path)
    if resolved.is_file():
        state = student_state_from_checkpoint(resolved, use_ema)
        source = f"checkpoint {resolved}"
    elif resolved.is_dir():
        state = student.pretrained_state_dict(str(resolved))
        source = f"diffusers folder {resolved}"
    else:
        raise ModelFolderError(f"{path}: no such checkpoint file or model folder")
    missing, unexpected = student.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{path}: weights do not fit the student ({len(missing)} missing, e.g. {missing[:3]}; "
            f"{len(unexpected)} unexpected, e.g. {unexpected[:3]})"
        )
    return source
