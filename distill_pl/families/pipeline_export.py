"""A student written as its family's full diffusers pipeline folder.

The folder is the teacher's pipeline folder -- ``model_index.json`` and every component it
lists (VAE, text encoder, tokenizer, ...), copied unchanged -- with the student's own model
folders (``Denoiser.save_components``: ``transformer/``, and ``controlnet/`` for a family
that has one) and a ``scheduler/`` for the student's noise levels in place of the teacher's.
``<PipelineClass>.from_pretrained(folder)`` loads it. Components the teacher's
``model_index.json`` lists as ``[null, null]`` (absent) stay absent.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from distill_pl.util.media import follow_umask, write_text
from distill_pl.models.denoiser import Denoiser
from distill_pl.models.loading import ModelFolderError, read_json
from distill_pl.util.paths import resolve_path


def save_pipeline_folder(
    folder: str | Path,
    student: Denoiser,
    teacher_pipeline_folder: str | Path,
    pipeline_class: str,
    scheduler,
    replace: bool = False,
) -> Path:
    """Write ``folder`` (which must not exist yet): the ``pipeline_class`` folder of
    ``teacher_pipeline_folder`` with the student's components and ``scheduler`` (a diffusers
    scheduler, saved as ``scheduler/`` and named in ``model_index.json``). Built in a
    temporary sibling folder and renamed at the end, so ``folder`` is never half written.
    With ``replace``, an existing ``folder`` that is a ``pipeline_class`` folder (an earlier
    export) is replaced; any other existing path is still an error. Returns ``folder``.

    Raises :class:`ModelFolderError` naming the teacher folder when it has no
    ``model_index.json`` of ``pipeline_class`` or lacks a component that file lists."""
    folder = Path(folder)
    teacher = resolve_path(teacher_pipeline_folder)
    index = _model_index(teacher, pipeline_class)
    earlier = replace and is_pipeline_folder(folder, pipeline_class)
    if folder.exists() and not earlier:
        raise FileExistsError(f"{folder}: already exists; remove it or choose another folder")
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        student.save_components(str(staging))
        for name, entry in index.items():
            if name.startswith("_") or name == "scheduler" or (staging / name).exists() or not is_component(entry):
                continue
            if not (teacher / name).is_dir():
                raise ModelFolderError(f"{teacher}: model_index.json lists {name!r} but there is no {name}/")
            shutil.copytree(teacher / name, staging / name)
        scheduler.save_pretrained(str(staging / "scheduler"))
        index["scheduler"] = ["diffusers", type(scheduler).__name__]
        write_text(staging / "model_index.json", json.dumps(index, indent=2) + "\n")
        follow_umask(staging)  # mkdtemp makes it 0700, safetensors writes 0600 files
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


def is_pipeline_folder(folder: Path, pipeline_class: str) -> bool:
    """Whether ``folder`` holds a ``model_index.json`` of a ``pipeline_class`` pipeline."""
    try:
        return json.loads((folder / "model_index.json").read_text()).get("_class_name") == pipeline_class
    except (OSError, ValueError, AttributeError):
        return False


def _model_index(teacher: Path, pipeline_class: str) -> dict:
    file = teacher / "model_index.json"
    if not file.is_file():
        raise ModelFolderError(
            f"{teacher}: no model_index.json; the student pipeline is built from the teacher's "
            f"{pipeline_class} folder (VAE, text encoder, tokenizer)"
        )
    index = read_json(file)
    if index.get("_class_name") != pipeline_class:
        raise ModelFolderError(f"{file}: a {index.get('_class_name')!r} pipeline, expected {pipeline_class!r}")
    return index


def is_component(entry) -> bool:
    """A saved component: ``[library, class]`` with both set (``[null, null]`` is an absent one)."""
    return isinstance(entry, list) and len(entry) == 2 and entry[0] is not None and entry[1] is not None
