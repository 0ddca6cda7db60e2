"""Which Wan layout a folder holds, read from its configs (no weights are read).

A Wan diffusers folder is one of

- Wan 2.1 (and any folder without the keys below): one ``transformer/``; what
  ``from_config`` takes is that transformer's config;
- Wan 2.2 TI2V: ``model_index.json`` sets ``expand_timesteps`` (per-token timesteps, the
  image's latent frame kept clean): ``{"transformer": config, "expand_timesteps": True}``;
- Wan 2.2 A14B: ``model_index.json`` lists a second expert ``transformer_2`` and the
  ``boundary_ratio`` between them (``transformer`` denoises timesteps
  ``>= boundary_ratio * 1000``, ``transformer_2`` the rest): ``{"transformer": config,
  "transformer_2": config, "boundary_ratio": r, "pipeline_class": model_index's
  _class_name}`` (plus ``"expand_timesteps": True`` for experts of that kind).

A Wan 2.2 denoiser's ``save_components`` writes that ``model_index.json`` beside its model
folders (:func:`write_layout_index`), in the format of the pipeline's own ``save_pretrained``, so
the folder reloads as the same layout. A folder with ``transformer_2/`` and no
``model_index.json`` (saved before the index was written there) is refused: read as one Wan 2.1
transformer it would lose its low-noise expert.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from distill_pl.families.pipeline_export import is_component
from distill_pl.models.loading import ModelFolderError, read_config, read_json, transformer_config_file
from distill_pl.util.media import write_text
from distill_pl.util.paths import resolve_path

#: the pipeline component of the low-noise expert
SECOND_EXPERT = "transformer_2"


def wan_folder_config(path: str | Path) -> dict:
    """What the Wan adapters' ``from_config`` takes, for the folder ``path`` (see the module
    docstring). ModelFolderError naming the file for a second expert without
    ``boundary_ratio`` (or with one outside (0, 1)) or without its ``config.json``."""
    root = resolve_path(path)
    transformer = read_config(transformer_config_file(root))
    index_file = root / "model_index.json"
    if not index_file.is_file() and (root / SECOND_EXPERT).is_dir():
        raise ModelFolderError(
            f"{root}: holds {SECOND_EXPERT}/ (a low-noise expert) but no model_index.json with the boundary_ratio "
            f"between the experts; copy the teacher pipeline's model_index.json into it, or load the pipeline folder")
    index = read_json(index_file) if index_file.is_file() else {}
    two_experts = is_component(index.get(SECOND_EXPERT))
    expand = bool(index.get("expand_timesteps"))
    if not (two_experts or expand):
        return transformer
    config: dict = {"transformer": transformer}
    if expand:
        config["expand_timesteps"] = True
    if two_experts:
        ratio = index.get("boundary_ratio")
        if not isinstance(ratio, (int, float)) or not 0.0 < ratio < 1.0:
            raise ModelFolderError(
                f"{index_file}: lists {SECOND_EXPERT} (a low-noise expert) but its boundary_ratio is "
                f"{ratio!r}; two experts need the noise boundary between them, a number in (0, 1)")
        second = root / SECOND_EXPERT / "config.json"
        if not second.is_file():
            raise ModelFolderError(f"{index_file}: lists {SECOND_EXPERT} but there is no {second}")
        config.update({SECOND_EXPERT: read_config(second), "boundary_ratio": float(ratio),
                       "pipeline_class": index.get("_class_name", "WanPipeline")})
    return config


def write_layout_index(
    folder: str | Path, pipeline_class: str, components: dict[str, nn.Module],
    boundary_ratio: float | None = None, expand_timesteps: bool = False,
) -> Path:
    """Write ``folder/model_index.json`` (atomically) as ``pipeline_class``'s ``save_pretrained``
    writes it for a pipeline holding only ``components`` (pipeline component name -> diffusers
    model; every other component ``[null, null]``), with ``boundary_ratio`` (None: one
    transformer) and ``expand_timesteps``: the layout :func:`wan_folder_config` reads back.
    Returns the file."""
    import inspect

    import diffusers

    pipeline = getattr(diffusers, pipeline_class)
    required = [name for name, parameter in inspect.signature(pipeline.__init__).parameters.items()
                if name != "self" and parameter.default is inspect.Parameter.empty]
    absent = {name: None for name in required if name not in components}
    index = pipeline(**absent, **components, boundary_ratio=boundary_ratio, expand_timesteps=expand_timesteps)
    return write_text(Path(folder) / "model_index.json", index.to_json_string())
