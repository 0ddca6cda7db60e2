"""``distill-pl export``: a KD or DMD2 checkpoint's student as one diffusers folder.

    distill-pl export --ckpt runs/wan/dmd2/checkpoints/last.ckpt --out students/wan_1step

The checkpoint is a distributed one (a folder of ``*.distcp`` shards + ``meta.pt``, written
under :class:`distill_pl.training.strategies.FSDP2Strategy`) or a single ``.ckpt`` file. One process,
no process group: the student is built on the meta device from the teacher's transformer
config (by its family's adapter, which the registry picks), given empty CPU tensors, and only
the student's keys are read from the shards (``torch.distributed.checkpoint.load``), so
neither the optimizer states nor the other networks are loaded; a LoRA student
(``student_lora_rank``) is built with its adapters and exported with them merged into full
float32 weights and, where its family has a diffusers LoRA format and its base is the teacher,
also as LoRA files for the teacher's pipeline in ``lora/`` (for a two-expert Wan 2.2 student
the HIGH/LOW pair; see :mod:`distill_pl.export.lora_files`). The folder is what the run's
own ``export_dir`` holds: ``transformer/`` (full float weights) and a flow-match Euler
``scheduler/`` with the teacher's shift -- for a family with its own diffusers pipeline (Wan
VACE, Cosmos-Transfer2.5) the whole pipeline folder, its other components from the teacher's --,
``student_steps.json`` (the student's noise levels, from the run's ``student_sigmas``, and its
sampler: a KD run's ``student_sampler``, DMD2's re-noising) and
``student.json`` (the data settings, the adapter's options) when the checkpoint records them.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from distill_pl.export.lora_files import student_lora_files
from distill_pl.models.lora import add_lora, lora_scale, merged_lora_state
from distill_pl.models.sharding import denoiser_from_state_dict
from distill_pl.models.student_init import EMA_PREFIX, STUDENT_PREFIX
from distill_pl.util.checkpoint_files import SHARDED_METADATA, check_checkpoint, check_lightning_checkpoint, load_error


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(prog="distill-pl export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", required=True, help="distributed checkpoint folder or .ckpt file")
    parser.add_argument("--out", required=True,
                        help="output folder (transformer/ + scheduler/, or the family's pipeline folder; "
                             "a LoRA student trained from the teacher also as LoRA files in lora/)")
    parser.add_argument("--weights", choices=("auto", "ema", "student"), default="auto",
                        help="auto: the EMA weights when the checkpoint has them, else the raw student")
    parser.add_argument("--teacher", default=None,
                        help="teacher folder (architecture and shift); default: the run's model.teacher")
    args = parser.parse_args(argv)
    from distill_pl.models.finite_weights import NonFiniteWeightsError

    try:
        return export_student(args.ckpt, args.out, args.weights, args.teacher)
    except NonFiniteWeightsError as err:
        raise SystemExit(f"distill-pl export: {args.ckpt}: {err}") from None


def export_student(ckpt: str | Path, out: str | Path, weights: str = "auto", teacher: str | None = None) -> Path:
    from distill_pl.diffusion.student_steps import student_noise_levels
    from distill_pl.families.registry import build_denoiser, denoiser_config
    from distill_pl.export.model_folders import load_scheduler, save_student_folder, scheduler_shift

    ckpt = check_checkpoint(ckpt, "--ckpt")  # one line naming a missing, torn or foreign file
    sharded = ckpt.is_dir()
    file = ckpt / SHARDED_METADATA if sharded else ckpt
    try:
        meta = torch.load(file, map_location="cpu", weights_only=False, mmap=not sharded)
    except Exception as err:  # torn contents: torch's pickle, zip or storage errors
        raise load_error(file, err, "--ckpt") from None
    check_lightning_checkpoint(meta, file, "--ckpt", "global_step" if sharded else "state_dict")
    hparams = meta.get("hyper_parameters", {})
    teacher = teacher or hparams.get("teacher")
    if teacher is None:
        raise SystemExit(f"distill-pl export: {ckpt} records no teacher folder; pass --teacher")
    keys = _checkpoint_keys(ckpt) if sharded else set(meta["state_dict"])
    prefix = _prefix(keys, weights, ckpt)

    lora_rank = hparams.get("student_lora_rank")  # a LoRA student: its frozen base (teacher's dtype) + adapters
    dtype = "float32" if lora_rank is None else hparams.get("teacher_dtype", "float32")
    template = build_denoiser(*denoiser_config(teacher), dtype=dtype, on_meta=True,
                              **(hparams.get("denoiser_options") or {}))
    if lora_rank is not None:
        add_lora(template, lora_rank, hparams.get("student_lora_alpha"), hparams.get("student_lora_targets"))
    if sharded:
        from torch.distributed.checkpoint import load as dcp_load

        state = {k: torch.empty(v.shape, dtype=v.dtype) for k, v in template.state_dict().items()}
        request = {"state_dict": {prefix + k: v for k, v in state.items()}}
        dcp_load(request, checkpoint_id=str(ckpt), no_dist=True)
        state = {k[len(prefix):]: v for k, v in request["state_dict"].items()}
    else:
        state = {k[len(prefix):]: v for k, v in meta["state_dict"].items() if k.startswith(prefix)}
    student = denoiser_from_state_dict(template, merged_lora_state(state, lora_scale(template)))
    lora = None if lora_rank is None else student_lora_files(template, state, hparams, teacher)
    settings = meta.get("datamodule_hyper_parameters")
    shift = scheduler_shift(load_scheduler(teacher))
    levels = student_noise_levels(hparams.get("student_sigmas", [1.0]), shift,
                                  hparams.get("student_sigmas_shifted", False))
    return save_student_folder(out, student, shift, settings, levels, teacher,
                               hparams.get("student_sampler", "renoise"), lora)


def _checkpoint_keys(folder: Path) -> set[str]:
    from torch.distributed.checkpoint import FileSystemReader

    names = FileSystemReader(str(folder)).read_metadata().state_dict_metadata
    return {k[len("state_dict."):] for k in names if k.startswith("state_dict.")}


def _prefix(keys: set[str], weights: str, ckpt: Path) -> str:
    has_ema = any(k.startswith(EMA_PREFIX) for k in keys)
    if weights == "ema" and not has_ema:
        raise SystemExit(f"distill-pl export: {ckpt} holds no EMA weights ({EMA_PREFIX}*)")
    if weights == "student" or not has_ema:
        if not any(k.startswith(STUDENT_PREFIX) for k in keys):
            raise SystemExit(f"distill-pl export: {ckpt} holds no student weights ({STUDENT_PREFIX}*)")
        return STUDENT_PREFIX
    return EMA_PREFIX
