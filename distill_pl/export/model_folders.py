"""A teacher as a diffusers-style folder: ``transformer/`` and ``scheduler/``.

``transformer/`` is a diffusers model folder (config.json + safetensors) and
``scheduler/scheduler_config.json`` the diffusers flow scheduler the teacher samples with
(its ``flow_shift``/``shift`` is the teacher's timestep shift). Both load with plain
diffusers classes, and the project reads the shift from the scheduler config.

A student folder also holds ``student_steps.json``, its noise levels (see
:func:`save_student_folder`), and may hold ``student.json``, the data settings its
conditioning was built with (see :mod:`distill_pl.export.student_settings`); ``scripts/one_step_diffusers.py``
reads both. A LoRA student's folder may hold ``lora/``: its adapters as LoRA files for the
teacher's pipeline (:mod:`distill_pl.export.lora_files`).
"""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path
from typing import Iterator, Mapping, Sequence

from torch import nn

from distill_pl.diffusion.sampling import SchedulerName, StudentSampler, build_flow_scheduler
from distill_pl.diffusion.student_steps import student_noise_levels, unshift_sigma
from distill_pl.util.media import atomic_folder, write_text
from distill_pl.models.denoiser import Denoiser
from distill_pl.models.finite_weights import check_finite
from distill_pl.models.loading import ModelFolderError
from distill_pl.models.lora import lora_scale
from distill_pl.models.sharding import gathered_state_dict, plain_denoiser
from distill_pl.export.lora_files import LORA_FOLDER, student_lora_files, write_lora_files
from distill_pl.export.student_settings import STUDENT_SETTINGS, student_settings
from distill_pl.util.paths import resolve_path


class ExportWriteError(OSError):
    """A model folder could not be written (disk full, folder not writable); nothing of it is
    left at its path."""


@contextlib.contextmanager
def _written_whole(folder: Path) -> Iterator[Path]:
    """:func:`~distill_pl.util.media.atomic_folder` of ``folder``: an OS error while writing
    becomes an :class:`ExportWriteError` naming ``folder``."""
    try:
        with atomic_folder(folder) as staging:
            yield staging
    except ExportWriteError:
        raise
    except OSError as err:
        error = ExportWriteError(f"cannot write the model folder {folder}: {err.strerror or err} "
                                 f"(nothing was left there)")
        error.errno = err.errno
        raise error from err


def save_teacher_folder(
    folder: str | Path, denoiser: Denoiser, scheduler: SchedulerName, shift: float
) -> Path:
    """Write the denoiser's components (``folder/transformer``, and any other model folder
    its adapter has, see ``Denoiser.save_components``) and ``folder/scheduler``, built beside
    ``folder`` and renamed into place (a failure, e.g. a full disk, leaves no half folder:
    :class:`ExportWriteError`); refuse non-finite weights
    (:class:`~distill_pl.models.finite_weights.NonFiniteWeightsError`, nothing written)."""
    folder = Path(folder)
    check_finite(denoiser.state_dict(), f"the model folder {folder}")
    with _written_whole(folder) as staging:
        denoiser.save_components(str(staging))
        build_flow_scheduler(scheduler, shift).save_pretrained(str(staging / "scheduler"))
    return folder


#: file of a student folder with its noise levels
STUDENT_STEPS_FILE = "student_steps.json"
#: an exported student's data settings and adapter options (:mod:`distill_pl.export.student_settings`)
STUDENT_SETTINGS_FILE = "student.json"


def save_student_folder(
    folder: str | Path,
    student: Denoiser,
    shift: float,
    data_hparams: Mapping | None = None,
    noise_levels: Sequence[float] = (1.0,),
    teacher: str | Path | None = None,
    sampler: StudentSampler = "renoise",
    lora: Mapping | None = None,
) -> Path:
    """A K-step student as a folder (``student.save_student_pipeline``): by default
    ``transformer/``, a flow-match Euler ``scheduler/`` with the teacher's shift
    (``stochastic_sampling`` for K > 1 with ``sampler="renoise"``: each step predicts x0 and
    re-noises it with fresh noise; plain Euler steps for ``sampler="euler"``, see
    :data:`~distill_pl.diffusion.sampling.StudentSampler`); a family with its own diffusers
    pipeline writes that pipeline's folder, its other components copied from the ``teacher``
    folder. Then ``student_steps.json``: ``noise_levels`` (the K levels the student is called
    at, decreasing from 1.0), ``sampler`` and ``scheduler_sigmas`` (the same before the shift:
    ``scheduler.set_timesteps(sigmas=...)`` with them reproduces the levels, since the
    scheduler shifts custom sigmas). One step from sigma = 1 is exactly
    ``x_g = eps - v(eps, 1)``. The folder is built beside ``folder`` and renamed into place:
    a failure (a full disk) leaves no half folder (:class:`ExportWriteError`). Prints where it
    went.

    With ``data_hparams`` (the training datamodule's ``hparams``) holding every key of
    :data:`~distill_pl.export.student_settings.STUDENT_SETTINGS`, also ``student.json``
    (:func:`~distill_pl.export.student_settings.student_settings`): those settings with the
    text encoder as a plain local path, the control's preprocessing and, if it has any, the
    student's ``adapter_options`` (e.g. the control scale its pipeline is called with).

    With ``lora`` (:func:`~distill_pl.export.lora_files.student_lora_files` of a LoRA
    student), also ``lora/``: the adapters as LoRA files for the teacher's pipeline and
    ``lora/lora.json``; without, a ``lora/`` left there by an earlier export is removed.
    """
    levels = student_noise_levels(noise_levels, shift, shifted=True)
    check_finite(student.state_dict(), f"the student folder {folder}")
    if sampler not in ("renoise", "euler"):
        raise ValueError(f"unknown student sampler {sampler!r}; expected 'renoise' or 'euler'")
    folder = Path(folder)
    with _written_whole(folder) as staging:
        student.save_student_pipeline(str(staging), None if teacher is None else str(teacher), shift, levels, sampler)
        steps = {"noise_levels": list(levels), "sampler": sampler,
                 "scheduler_sigmas": [unshift_sigma(s, shift) for s in levels]}
        write_text(staging / STUDENT_STEPS_FILE, json.dumps(steps, indent=2) + "\n")
        if data_hparams is not None and all(key in data_hparams for key in STUDENT_SETTINGS):
            settings = student_settings(data_hparams, student)
            write_text(staging / STUDENT_SETTINGS_FILE, json.dumps(settings, indent=2) + "\n")
        if lora is not None:
            write_lora_files(staging, lora)
    if lora is None and (folder / LORA_FOLDER).is_dir():
        shutil.rmtree(folder / LORA_FOLDER)  # not this student's adapters
    print(f"{len(levels)}-step student exported to {folder.resolve()}")
    if lora is not None:
        print(f"its adapters as LoRA files for the teacher's pipeline: {(folder / LORA_FOLDER).resolve()}")
    return folder


def export_student_of_run(
    trainer, student: nn.Module, folder: str, shift: float, noise_levels: tuple[float, ...] = (1.0,),
    teacher: str | None = None, sampler: str = "renoise",
) -> None:
    """A stage's export at the end of fit: every rank joins the gather of a sharded student,
    rank 0 writes the folder (``save_student_folder``: with its noise levels, the family's own
    pipeline folder where it has one, its other components from the ``teacher`` folder, and
    the run's data settings in ``student.json``; ``sampler``: how the student moves between
    its noise levels). A LoRA student is written with its adapters merged and, as
    ``distill-pl export`` does, also as LoRA files for the teacher's pipeline
    (:func:`~distill_pl.export.lora_files.student_lora_files` of the run's hyper-parameters)."""
    state = gathered_state_dict(student, trainer.global_rank)
    if trainer.is_global_zero:
        lora = None
        if lora_scale(student) is not None:
            lora = student_lora_files(student, state, trainer.lightning_module.hparams, teacher)
        save_student_folder(folder, plain_denoiser(student, state), shift, getattr(trainer.datamodule, "hparams", None),
                            noise_levels, teacher, sampler, lora)


def student_noise_levels_of(folder: str | Path) -> tuple[float, ...]:
    """The noise levels of an exported student (``student_steps.json``; a folder without
    one, exported before it existed, is a one-step student)."""
    path = resolve_path(folder) / STUDENT_STEPS_FILE
    if not path.is_file():
        return (1.0,)
    try:
        levels = json.loads(path.read_text())["noise_levels"]
        return student_noise_levels(levels, 1.0, shifted=True)
    except (KeyError, TypeError, ValueError) as e:
        raise ModelFolderError(f"{path}: no valid noise_levels ({e})") from e


def student_sampler_of(folder: str | Path) -> StudentSampler:
    """How an exported student moves between its noise levels (``student_steps.json``'s
    ``sampler``; ``"renoise"`` for a folder exported before the key existed)."""
    path = resolve_path(folder) / STUDENT_STEPS_FILE
    if not path.is_file():
        return "renoise"
    sampler = json.loads(path.read_text()).get("sampler", "renoise")
    if sampler not in ("renoise", "euler"):
        raise ModelFolderError(f"{path}: unknown sampler {sampler!r} (expected 'renoise' or 'euler')")
    return sampler


def student_adapter_options_of(folder: str | Path) -> dict:
    """The adapter options an exported student was trained with (``student.json``'s
    ``adapter_options``, e.g. Cosmos' ``control_scale``), for ``load_denoiser``; {} for a
    folder without them (a teacher, a family without options, an export without
    ``student.json``)."""
    path = resolve_path(folder) / STUDENT_SETTINGS_FILE
    if not path.is_file():
        return {}
    options = json.loads(path.read_text()).get("adapter_options") or {}
    if not isinstance(options, dict):
        raise ModelFolderError(f"{path}: adapter_options is not a JSON object ({options!r})")
    return options


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
