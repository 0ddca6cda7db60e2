"""A Cosmos 2.5 student as a full ``Cosmos2_5_TransferPipeline`` (or
``Cosmos2_5_PredictBasePipeline``) folder."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from distill_pl.diffusion.student_scheduler import few_step_euler_scheduler
from distill_pl.families.cosmos_transfer.configs import PIPELINE_CLASS
from distill_pl.families.pipeline_export import save_pipeline_folder
from distill_pl.models.denoiser import Denoiser


def save_cosmos_student_pipeline(
    folder: str | Path,
    student: Denoiser,
    teacher_pipeline_folder: str | Path,
    replace: bool = False,
    noise_levels: Sequence[float] = (1.0,),
    sampler: str = "renoise",
    pipeline_class: str = PIPELINE_CLASS,
) -> Path:
    """Write ``folder`` (which must not exist yet; with ``replace``, an earlier export there is
    replaced): ``model_index.json`` and every component of the teacher's ``pipeline_class``
    folder (``Cosmos2_5_TransferPipeline``, or ``Cosmos2_5_PredictBasePipeline`` for
    Cosmos-Predict2.5, which has no ControlNet and is called without ``controls``), with the
    student's ``transformer/`` (and ``controlnet/``) and a flow-match Euler ``scheduler/`` that
    samples at ``noise_levels`` (the student's, decreasing from 1.0; ValueError before
    anything is written when no such scheduler exists), stochastic for a re-noising ``sampler``.
    Returns ``folder``.

    The folder is the teacher's pipeline folder with the student's ``transformer/`` and
    ``controlnet/`` and a ``FlowMatchEulerDiscreteScheduler`` whose ``set_timesteps(K)`` gives the
    student's K noise levels (the pipeline takes no custom sigmas), see
    :func:`~distill_pl.diffusion.student_scheduler.few_step_euler_scheduler`: for one step, plain
    Euler from ``sigma = 1``, ``x - (1 - 0) v = eps - v(eps, 1)``, exactly the student's ``x_g``;
    for K > 1 steps, ``stochastic_sampling`` (predict ``x0 = x - s_k v``, re-noise it to
    ``s_{k+1}`` with fresh noise), the student's sampler
    (:func:`~distill_pl.diffusion.sampling.few_step_sample`). The pipeline then gives the
    student's output when called as

        pipe = Cosmos2_5_TransferPipeline.from_pretrained(folder)
        torch.manual_seed(seed)   # K > 1: the re-noise draws (see below)
        pipe(controls=..., prompt=..., num_inference_steps=K, guidance_scale=1.0, ...)

    (``guidance_scale <= 1`` turns the pipeline's CFG off; ``controls_conditioning_scale`` is the
    student's ``control_scale``). The pipeline does not pass its ``generator`` to
    ``scheduler.step``, so the K - 1 re-noise draws come from torch's global RNG; they are the
    draws ``few_step_sample`` would take as ``renoise`` (the last step draws one more, multiplied
    by the final sigma 0). Every other component (VAE, text encoder, tokenizer, the safety
    checker's entry) is copied from the teacher folder unchanged
    (:func:`~distill_pl.families.pipeline_export.save_pipeline_folder`).
    """
    return save_pipeline_folder(folder, student, teacher_pipeline_folder, pipeline_class,
                                few_step_euler_scheduler(noise_levels, sampler), replace=replace)
