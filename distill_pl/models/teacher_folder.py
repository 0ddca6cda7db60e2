"""A teacher as a diffusers-style folder: ``transformer/`` and ``scheduler/``.

``transformer/`` is a diffusers model folder (config.json + safetensors) and
``scheduler/scheduler_config.json`` the diffusers flow scheduler the teacher samples with
(its ``flow_shift``/``shift`` is the teacher's timestep shift). Both load with plain
diffusers classes, and the project reads the shift from the scheduler config.

A student folder may also hold ``student.json``, the data settings its conditioning was
built with (see :data:`STUDENT_SETTINGS`), read by ``scripts/one_step_diffusers.py``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

from distill_pl.diffusion.sampling import SchedulerName, build_flow_scheduler
from distill_pl.media import write_text
from distill_pl.models.denoiser import Denoiser
from distill_pl.models.loading import ModelFolderError
from distill_pl.paths import resolve_path


def save_teacher_folder(
    folder: str | Path, denoiser: Denoiser, scheduler: SchedulerName, shift: float
) -> Path:
    """Write the denoiser's components (``folder/transformer``, and any other model folder
    its adapter has, see ``Denoiser.save_components``) and ``folder/scheduler``; refuse
    non-finite weights (:class:`~distill_pl.stages.nonfinite.NonFiniteWeightsError`, nothing
    written)."""
    from distill_pl.stages.nonfinite import check_finite

    folder = Path(folder)
    check_finite(denoiser.state_dict(), f"the model folder {folder}")
    denoiser.save_components(str(folder))
    build_flow_scheduler(scheduler, shift).save_pretrained(str(folder / "scheduler"))
    return folder


#: the data settings (``VideoDataModule`` arguments) that ``student.json`` records: the
#: text encoder and its padded length, the clip size and frame stride, the canny thresholds
STUDENT_SETTINGS = (
    "text_encoder", "max_text_length", "num_frames", "frame_stride", "height", "width",
    "canny_low", "canny_high",
)


def save_student_folder(
    folder: str | Path,
    student: Denoiser,
    shift: float,
    data_hparams: Mapping | None = None,
    teacher: str | Path | None = None,
) -> Path:
    """A one-step student as a folder (``student.save_student_pipeline``): by default
    ``transformer/`` and a flow-match Euler ``scheduler/`` with the teacher's shift, so one
    Euler step from sigma = 1 is exactly ``x_g = eps - v(eps, 1)``; a family with its own
    diffusers pipeline writes that pipeline's folder, the other components copied from the
    ``teacher`` folder. Prints where it went.

    With ``data_hparams`` (the training datamodule's ``hparams``) holding every key of
    :data:`STUDENT_SETTINGS`, also ``student.json``: those settings plus ``control``,
    ``"canny"`` or None for a student without control, and, if it has any, ``adapter_options``
    (the student's own options, e.g. the control scale its pipeline is called with).
    """
    from distill_pl.stages.nonfinite import check_finite

    check_finite(student.state_dict(), f"the student folder {folder}")  # also for a family's own pipeline
    folder = Path(student.save_student_pipeline(str(folder), None if teacher is None else str(teacher), shift))
    if data_hparams is not None and all(key in data_hparams for key in STUDENT_SETTINGS):
        settings = {key: data_hparams[key] for key in STUDENT_SETTINGS}
        settings["control"] = "canny" if student.control_channels else None
        if student.adapter_options:
            settings["adapter_options"] = student.adapter_options
        write_text(folder / "student.json", json.dumps(settings, indent=2) + "\n")
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
