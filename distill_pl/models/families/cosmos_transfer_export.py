"""A one-step Cosmos-Transfer2.5 student written as a full ``Cosmos2_5_TransferPipeline`` folder.

The folder is the teacher's pipeline folder with the student's ``transformer/`` and
``controlnet/`` and a one-step scheduler: ``FlowMatchEulerDiscreteScheduler``, whose single
step from ``sigma = 1`` is ``x - (1 - 0) v = eps - v(eps, 1)``, exactly the student's
generation ``x_g``. The pipeline then gives the student's output when called as

    pipe = Cosmos2_5_TransferPipeline.from_pretrained(folder)
    pipe(controls=..., prompt=..., num_inference_steps=1, guidance_scale=1.0, ...)

(``guidance_scale <= 1`` turns the pipeline's CFG off; ``controls_conditioning_scale`` is the
student's ``control_scale``). Every other component (VAE, text encoder, tokenizer, the safety
checker's entry) is copied from the teacher folder unchanged
(:func:`~distill_pl.models.families.pipeline_export.save_pipeline_folder`).
"""

from __future__ import annotations

from pathlib import Path

from distill_pl.diffusion.sampling import build_student_scheduler
from distill_pl.models.families.cosmos_transfer import PIPELINE_CLASS, CosmosTransferDenoiser
from distill_pl.models.families.pipeline_export import save_pipeline_folder


def save_cosmos_student_pipeline(
    folder: str | Path,
    student: CosmosTransferDenoiser,
    teacher_pipeline_folder: str | Path,
    replace: bool = False,
) -> Path:
    """Write ``folder`` (which must not exist yet; with ``replace``, an earlier export there is
    replaced): ``model_index.json`` and every component of the teacher pipeline folder, with the
    student's ``transformer/`` and ``controlnet/`` and a one-step flow-match Euler
    ``scheduler/``. Returns ``folder``."""
    return save_pipeline_folder(folder, student, teacher_pipeline_folder, PIPELINE_CLASS,
                                build_student_scheduler(1.0, 1), replace=replace)
