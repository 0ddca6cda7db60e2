"""A teacher as a diffusers-style folder: ``transformer/`` and ``scheduler/``.

``transformer/`` is a diffusers model folder (config.json + safetensors) and
``scheduler/scheduler_config.json`` the diffusers flow scheduler the teacher samples with
(its ``flow_shift``/``shift`` is the teacher's timestep shift). Both load with plain
diffusers classes, and the project reads the shift from the scheduler config.
"""

from __future__ import annotations

import json
from pathlib import Path

from distill_pl.diffusion.sampling import SchedulerName, build_flow_scheduler
from distill_pl.models.denoiser import Denoiser
from distill_pl.models.loading import ModelFolderError
from distill_pl.paths import resolve_path


def save_teacher_folder(
    folder: str | Path, denoiser: Denoiser, scheduler: SchedulerName, shift: float
) -> Path:
    """Write ``folder/transformer`` and ``folder/scheduler``."""
    folder = Path(folder)
    denoiser.save_pretrained(str(folder / "transformer"))
    build_flow_scheduler(scheduler, shift).save_pretrained(str(folder / "scheduler"))
    return folder


def save_student_folder(folder: str | Path, student: Denoiser, shift: float) -> Path:
    """A one-step student as a folder: ``transformer/`` and a flow-match Euler
    ``scheduler/`` with the teacher's shift, so one Euler step from sigma = 1 is exactly
    ``x_g = eps - v(eps, 1)``. Prints where it went."""
    folder = save_teacher_folder(folder, student, "euler", shift)
    print(f"one-step student exported to {Path(folder).resolve()}")
    return folder


def load_scheduler(folder: str | Path):
    """The diffusers scheduler saved in ``folder/scheduler`` (or ``folder`` itself)."""
    import diffusers

    root = resolve_path(folder)
    for candidate in (root / "scheduler" / "scheduler_config.json", root / "scheduler_config.json"):
        if candidate.is_file():
            config = json.loads(candidate.read_text())
            cls = getattr(diffusers, config.get("_class_name", ""), None)
            if cls is None:
                raise ModelFolderError(f"{candidate}: unknown scheduler class {config.get('_class_name')!r}")
            return cls.from_config(config)
    raise ModelFolderError(f"{root}: no scheduler/scheduler_config.json (a teacher folder needs one)")


def scheduler_shift(scheduler) -> float:
    """The timestep shift of a flow scheduler (UniPC's ``flow_shift``, Euler's ``shift``)."""
    config = scheduler.config
    if getattr(config, "use_flow_sigmas", False):
        return float(config.flow_shift)
    if "shift" in config:
        return float(config.shift)
    raise ValueError(f"{type(scheduler).__name__} is not a flow-matching scheduler")
