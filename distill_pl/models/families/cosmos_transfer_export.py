"""A K-step Cosmos-Transfer2.5 student written as a full ``Cosmos2_5_TransferPipeline`` folder.

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
checker's entry) is copied from the teacher folder unchanged.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Sequence

from distill_pl.diffusion.student_scheduler import few_step_euler_scheduler
from distill_pl.media import write_text
from distill_pl.models.families.cosmos_transfer import PIPELINE_CLASS, CosmosTransferDenoiser
from distill_pl.models.loading import ModelFolderError
from distill_pl.paths import resolve_path

#: the pipeline components the student replaces
STUDENT_COMPONENTS = ("transformer", "controlnet", "scheduler")


def save_cosmos_student_pipeline(
    folder: str | Path,
    student: CosmosTransferDenoiser,
    teacher_pipeline_folder: str | Path,
    replace: bool = False,
    noise_levels: Sequence[float] = (1.0,),
) -> Path:
    """Write ``folder`` (which must not exist yet): ``model_index.json`` and every component of
    the teacher pipeline folder, with the student's ``transformer/`` and ``controlnet/`` and a
    flow-match Euler ``scheduler/`` that samples at ``noise_levels`` (the student's, decreasing
    from 1.0; ValueError before anything is written when no such scheduler exists). Built in
    a temporary sibling folder and renamed at the end, so ``folder`` is never half written. With ``replace``, an existing ``folder``
    that is a Cosmos-Transfer2.5 pipeline folder (an earlier export) is replaced; any other
    existing path is still an error. Returns ``folder``."""
    scheduler = few_step_euler_scheduler(noise_levels)
    folder = Path(folder)
    teacher = resolve_path(teacher_pipeline_folder)
    index = _model_index(teacher)
    earlier = replace and _is_pipeline_folder(folder)
    if folder.exists() and not earlier:
        raise FileExistsError(f"{folder}: already exists; remove it or choose another folder")
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        for name, entry in index.items():
            if name.startswith("_") or name in STUDENT_COMPONENTS or not _is_component(entry):
                continue
            if not (teacher / name).is_dir():
                raise ModelFolderError(f"{teacher}: model_index.json lists {name!r} but there is no {name}/")
            shutil.copytree(teacher / name, staging / name)
        student.save_pretrained(str(staging))
        scheduler.save_pretrained(str(staging / "scheduler"))
        index["scheduler"] = ["diffusers", "FlowMatchEulerDiscreteScheduler"]
        write_text(staging / "model_index.json", json.dumps(index, indent=2) + "\n")
        if earlier:  # the old export moves aside first: folder is always a whole pipeline
            old = Path(tempfile.mkdtemp(prefix=f".{folder.name}.old.", dir=folder.parent))
            os.replace(folder, old / folder.name)
            os.replace(staging, folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def _is_pipeline_folder(folder: Path) -> bool:
    """Whether ``folder`` holds a ``model_index.json`` of a Cosmos-Transfer2.5 pipeline."""
    try:
        return json.loads((folder / "model_index.json").read_text()).get("_class_name") == PIPELINE_CLASS
    except (OSError, ValueError, AttributeError):
        return False


def _model_index(teacher: Path) -> dict:
    file = teacher / "model_index.json"
    if not file.is_file():
        raise ModelFolderError(
            f"{teacher}: no model_index.json; the student pipeline is built from the teacher's "
            f"{PIPELINE_CLASS} folder (VAE, text encoder, tokenizer)"
        )
    try:
        index = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ModelFolderError(f"{file}: not valid JSON ({error})") from error
    if index.get("_class_name") != PIPELINE_CLASS:
        raise ModelFolderError(
            f"{file}: a {index.get('_class_name')!r} pipeline, expected {PIPELINE_CLASS!r}"
        )
    return index


def _is_component(entry) -> bool:
    """A saved component: ``[library, class]`` with both set (``[null, null]`` is an absent one)."""
    return isinstance(entry, list) and len(entry) == 2 and entry[0] is not None and entry[1] is not None
