"""The samplers the report compares: the teacher with k steps and CFG, one- and few-step students.

A :class:`Method` turns (noise, conditioning) into clean latents; ``nfe`` is its network
calls per video (a CFG step is 2: the conditional and the unconditional branch, run as one
batched call of twice the batch).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor

from distill_pl.diffusion.sampling import StudentSampler, sample_with_scheduler, student_sample
from distill_pl.models.conditioning import Conditioning
from distill_pl.models.denoiser import Denoiser
from distill_pl.models.guidance import uses_cfg, velocity_fn

Sampler = Callable[[Tensor, Conditioning, Conditioning], Tensor]


@dataclass
class Method:
    """``sample(noise, cond, uncond) -> x0`` with ``nfe`` network calls per video."""

    key: str  # file-safe name
    name: str  # what the report calls it
    nfe: int
    sample: Sampler


def teacher_method(teacher: Denoiser, scheduler, steps: int, guidance: float, key_with_guidance: bool = False,
                   guidance_2: float | None = None) -> Method:
    """The teacher with ``steps`` steps of its own scheduler and CFG weight ``guidance``
    (``guidance_2``: the weight at the levels of a two-expert teacher's low-noise expert, see
    :func:`~distill_pl.models.guidance.velocity_fn`; None: ``guidance`` there too).

    Its key is ``teacher_<steps>step``, or ``teacher_<steps>step_w<guidance>`` (``.`` as ``p``,
    e.g. ``teacher_36step_w6``) with ``key_with_guidance``: a second teacher row with the same
    steps at another guidance (the evaluation's extra reference). Its name gives both weights
    (``"teacher 36-step CFG w=8 low-noise w=5"``)."""
    cfg = uses_cfg(guidance, guidance_2)

    def sample(noise: Tensor, cond: Conditioning, uncond: Conditioning) -> Tensor:
        fn = velocity_fn(teacher, cond, uncond if cfg else None, guidance, guidance_2)
        return teacher.finish_sample(sample_with_scheduler(fn, noise, scheduler, steps,
                                                           step_sigma=teacher.sampler_sigma), cond)

    label = f"teacher {steps}-step" + (f" CFG w={guidance:g}" if cfg else "")
    label += "" if guidance_2 is None else f" low-noise w={guidance_2:g}"
    key = f"teacher_{steps}step" + (f"_w{guidance:g}".replace(".", "p").replace("-", "m") if key_with_guidance else "")
    return Method(key, label, steps * (2 if cfg else 1), sample)


def student_method(
    name: str, student: Denoiser, noise_levels: Sequence[float] = (1.0,), seed: int = 0,
    sampler: StudentSampler = "renoise",
) -> Method:
    """A K-step student at its ``noise_levels`` with its ``sampler`` (Euler re-noising or
    deterministic Euler, see :func:`~distill_pl.diffusion.sampling.student_sample`), no CFG,
    K network calls; one step is ``x = eps - v(eps, 1)``. The report names it
    ``"<name> student <K>-step"`` (``" Euler"`` added for a deterministic few-step student).
    The re-noising noise comes from one generator seeded with ``seed``, drawn batch after
    batch in the order the batches are sampled."""
    levels = tuple(noise_levels)
    generator = torch.Generator().manual_seed(seed)

    def sample(noise: Tensor, cond: Conditioning, uncond: Conditioning) -> Tensor:
        return student_sample(lambda x, s: student(x, s, cond), noise, levels, sampler, generator)

    key = "student_" + "".join(c if c.isalnum() else "_" for c in name.lower())
    label = f"{name} student {len(levels)}-step" + (" Euler" if sampler == "euler" and len(levels) > 1 else "")
    return Method(key, label, len(levels), sample)
