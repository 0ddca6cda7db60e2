"""A LoRA student's adapters also as LoRA files for the teacher's own diffusers pipeline.

A LoRA student (``student_lora_rank``) trained from the teacher's weights (no ``init_from``)
is the teacher plus its adapters, so besides the full student folder its adapters alone,
applied to the teacher pipeline with diffusers' ``load_lora_weights``, give the same student.
Where its family has such a format (``Denoiser.lora_files``), the export writes into the
student folder:

- ``lora/<file>.safetensors``: one file per pipeline component, in the layout of
  :func:`~distill_pl.models.lora.diffusers_lora_state` (keys
  ``transformer.<module path>.lora_A.weight`` [r, in] and ``.lora_B.weight`` [out, r], float32,
  ``alpha / r`` folded into ``lora_B``, so no alphas); for a two-expert Wan student the HIGH/LOW
  pair ``high_noise_lora.safetensors`` (into ``transformer``) and ``low_noise_lora.safetensors``
  (``load_into_transformer_2=True``);
- ``lora/lora.json``: ``{"teacher": the teacher folder the adapters apply to, "rank",
  "alpha", "components": {file: pipeline component}, "scheduler": "scheduler",
  "student_steps": "student_steps.json"}`` -- the student's scheduler is the student folder's
  ``scheduler/`` (it replaces the teacher pipeline's) and its noise levels are
  ``student_steps.json``'s.

A student whose base is another checkpoint's weights (``init_from``: a KD student) gets no
LoRA files: its adapters apply to that base, not to the teacher.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

from torch import Tensor

from distill_pl.models.denoiser import Denoiser
from distill_pl.models.lora import diffusers_lora_state, lora_scale
from distill_pl.util.media import write_text

#: the student folder's subfolder with the LoRA files
LORA_FOLDER = "lora"
#: what the LoRA files are and how they load (see the module docstring)
LORA_INDEX = "lora.json"


def student_lora_files(template: Denoiser, state: Mapping[str, Tensor], hparams: Mapping,
                       teacher: str) -> dict | None:
    """The LoRA files of a LoRA student (``template``: its architecture with adapters;
    ``state``: its state dict; ``hparams``: the run's, with ``student_lora_rank``,
    ``student_lora_alpha`` and ``init_from``), as :func:`write_lora_files` takes them:
    ``{"files": {name: tensors}, "index": the lora.json dict}``; None (and a printed line
    saying why) when its family has no LoRA format or its base is not the ``teacher``."""
    if not template.lora_files:
        print(f"no LoRA files written: {type(template).__name__} has no diffusers LoRA format")
        return None
    if hparams.get("init_from") is not None:
        print(f"no LoRA files written: the student's base is {hparams['init_from']} (init_from), "
              f"not the teacher {teacher}")
        return None
    scale = lora_scale(template)
    files = {name: diffusers_lora_state(state, prefix, scale)
             for name, (prefix, _) in template.lora_files.items()}
    rank = hparams["student_lora_rank"]
    index = {"teacher": str(teacher), "rank": rank, "alpha": hparams.get("student_lora_alpha") or rank,
             "components": {name: component for name, (_, component) in template.lora_files.items()},
             "scheduler": "scheduler", "student_steps": "student_steps.json"}
    return {"files": files, "index": index}


def write_lora_files(folder: Path, lora: Mapping) -> None:
    """Write :func:`student_lora_files`' files and index into ``folder/lora/`` (``folder``: a
    student folder being built, renamed into place when whole)."""
    from safetensors.torch import save_file

    out = folder / LORA_FOLDER
    out.mkdir()
    for name, tensors in lora["files"].items():
        save_file(tensors, str(out / name), metadata={"format": "pt"})
    write_text(out / LORA_INDEX, json.dumps(lora["index"], indent=2) + "\n")
