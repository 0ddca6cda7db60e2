"""One way into a model family: the folder's diffusers ``_class_name`` picks the adapter.

A model folder is a diffusers pipeline root (``model_index.json``, whose ``transformer``
entry names the class; a family whose transformer class another family shares is keyed by its
pipeline class, the index's ``_class_name``, e.g. Cosmos-Predict2.5), a teacher folder (``transformer/config.json``) or a model folder
itself (``config.json``). Its class name selects a :class:`~distill_pl.models.denoiser.Denoiser`
adapter from :data:`FAMILIES`; an unregistered class is a one-line
:class:`~distill_pl.models.loading.ModelFolderError` naming the folder and the supported classes.

Adding a family is one package in this folder (its adapter, configs, export, text encoder)
and one line in :data:`FAMILIES`. Adapters are imported only when a folder of their class is
loaded.

A text encoder folder is picked the same way, by its ``config.json``'s ``model_type``: a
family whose pipeline embeds prompts its own way declares its encoder in its package's
``configs.TEXT_ENCODERS`` (:func:`text_encoders`); any other model is the generic
:class:`~distill_pl.models.text_encoder.TextEncoder` (last hidden state, zero at padding).
Every encoder class has ``encode(prompts) -> (embeds [N, L, D] float32, mask [N, L] bool)``,
``dim``, ``folder_dim(path)`` (D from the config only) and ``text_embedding`` (the recipe,
for ``student.json``).
"""

from __future__ import annotations

import importlib
from pathlib import Path

from distill_pl.models.denoiser import Denoiser
from distill_pl.models.loading import (
    TRANSFORMER_COMPONENT,
    ModelFolderError,
    find_diffusers_model_folder,
    read_json,
)
from distill_pl.models.text_encoder import TextEncoder, text_encoder_model_type
from distill_pl.util.paths import resolve_path

#: diffusers transformer class name -> ``"module:AdapterClass"`` of its Denoiser adapter
FAMILIES: dict[str, str] = {
    "WanTransformer3DModel": "distill_pl.families.wan.adapter:WanDenoiser",
    "WanVACETransformer3DModel": "distill_pl.families.wan.vace:WanVACEDenoiser",
    "CosmosTransformer3DModel": "distill_pl.families.cosmos_transfer.adapter:CosmosTransferDenoiser",
    "Cosmos2_5_PredictBasePipeline": "distill_pl.families.cosmos_transfer.predict:CosmosPredictDenoiser",
}


def family_packages() -> list[str]:
    """The packages of the registered families (``distill_pl.families.<family>``), in
    :data:`FAMILIES` order."""
    modules = (entry.partition(":")[0] for entry in FAMILIES.values())
    return list(dict.fromkeys(module.rpartition(".")[0] for module in modules))


def _family_constants(name: str) -> dict:
    """The ``configs.<name>`` dicts of the registered family packages, merged (a family
    without a ``configs`` module or without ``name`` adds nothing). Imports only the
    ``configs`` modules, never an adapter."""
    found: dict = {}
    for package in family_packages():
        try:
            configs = importlib.import_module(f"{package}.configs")
        except ModuleNotFoundError as error:
            if error.name != f"{package}.configs":
                raise
            continue
        found.update(getattr(configs, name, {}))
    return found


def published_configs() -> dict[str, tuple[str, dict]]:
    """Diffusers folder name -> (transformer class name, what ``from_config`` takes) of every
    published model of the registered families (each family package's ``configs.PUBLISHED``)."""
    return _family_constants("PUBLISHED")


def published_vae_configs() -> dict[str, dict]:
    """Diffusers folder name -> ``vae/config.json`` (without ``_`` keys) of the published models
    whose VAE is not diffusers' ``AutoencoderKLWan`` default (each family package's
    ``configs.PUBLISHED_VAES``)."""
    return _family_constants("PUBLISHED_VAES")


def text_encoders() -> dict[str, str]:
    """transformers ``model_type`` of a text encoder folder -> ``"module:EncoderClass"`` of a
    family's own prompt embedding (each family package's ``configs.TEXT_ENCODERS``); any other
    model is :class:`~distill_pl.models.text_encoder.TextEncoder`."""
    return _family_constants("TEXT_ENCODERS")


def supported_classes() -> list[str]:
    return sorted(FAMILIES)


def adapter_class(class_name: str, where: str | Path = "") -> type[Denoiser]:
    """The adapter class registered for ``class_name`` (``where`` names the folder in errors)."""
    if class_name not in FAMILIES:
        prefix = f"{where}: " if where else ""
        raise ModelFolderError(
            f"{prefix}model class {class_name!r} is not supported; supported classes: "
            f"{', '.join(supported_classes())}"
        )
    return _imported(FAMILIES[class_name])


def _imported(entry: str) -> type:
    """The class an entry ``"module:Class"`` names, its module imported."""
    module, _, name = entry.partition(":")
    return getattr(importlib.import_module(module), name)


def _layout_adapter(cls: type[Denoiser], config: dict) -> type[Denoiser]:
    """The adapter that builds ``config``: ``cls``, or the one its ``variant`` names."""
    entry = cls.variant(config)
    return cls if entry is None else _imported(entry)


def folder_class_name(path: str | Path) -> str:
    """The ``_class_name`` of the denoising transformer of a folder.

    Read from ``model_index.json`` (its ``transformer`` entry, ``[library, class]``), else
    ``transformer/config.json``, else ``config.json``. ModelFolderError naming the folder if
    none of them exists or is readable.
    """
    root = resolve_path(path)
    if not root.is_dir():
        raise ModelFolderError(
            f"{root}: model folder does not exist. Only local diffusers folders are loaded "
            "(never from the Hugging Face hub); download the model and give its local path."
        )
    index = root / "model_index.json"
    if index.is_file():
        pipeline = read_json(index).get("_class_name")
        if pipeline in FAMILIES:  # a family keyed by its pipeline: its transformer class is shared
            return pipeline
        entry = read_json(index).get(TRANSFORMER_COMPONENT)
        if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[1], str)):
            raise ModelFolderError(f"{index}: no {TRANSFORMER_COMPONENT!r} entry [library, class]")
        return entry[1]
    for config in (root / TRANSFORMER_COMPONENT / "config.json", root / "config.json"):
        if config.is_file():
            found = read_json(config).get("_class_name")
            if not isinstance(found, str):
                raise ModelFolderError(f"{config}: no _class_name")
            return found
    raise ModelFolderError(
        f"{root}: no model_index.json, {TRANSFORMER_COMPONENT}/config.json or config.json; "
        "expected a diffusers pipeline, teacher or model folder"
    )


def transformer_folder(path: str | Path) -> Path:
    """The folder holding the denoising transformer's ``config.json`` and safetensors
    (``path`` itself or its ``transformer/``), checked like :func:`find_diffusers_model_folder`."""
    adapter = adapter_class(folder_class_name(path), resolve_path(path))
    transformer_class = getattr(adapter, "transformer_class_name", adapter.class_name)
    return find_diffusers_model_folder(str(path), transformer_class, TRANSFORMER_COMPONENT)


def denoiser_config(path: str | Path) -> tuple[str, dict]:
    """(class name, what the adapter's ``from_config`` takes) of a folder, read without its
    weights (the adapter's ``folder_config``): with :func:`build_denoiser`, the folder's
    architecture on the meta device (export, memory estimates)."""
    class_name = folder_class_name(path)
    return class_name, adapter_class(class_name, resolve_path(path)).folder_config(str(path))


def folder_adapter(path: str | Path) -> type[Denoiser]:
    """The adapter class of a folder: the one registered for its class name, or the variant
    it names for the folder's layout (``Denoiser.variant`` of its ``folder_config``)."""
    cls = adapter_class(folder_class_name(path), resolve_path(path))
    return _layout_adapter(cls, cls.folder_config(str(path)))


def load_denoiser(
    path: str | Path, dtype: str = "float32", gradient_checkpointing: bool = False, **adapter_options
) -> Denoiser:
    """The Denoiser of a local folder, its adapter picked by the folder's class name.

    ``dtype`` is the parameter dtype (``"float32"``, ``"bfloat16"``, ``"float16"``);
    ``adapter_options`` are the adapter's own keyword arguments (e.g. Wan VACE's
    ``conditioning_scale``).
    """
    cls = folder_adapter(path)
    return cls(path=str(path), dtype=dtype, gradient_checkpointing=gradient_checkpointing, **adapter_options)


def build_denoiser(
    class_name: str,
    config: dict,
    dtype: str = "float32",
    gradient_checkpointing: bool = False,
    on_meta: bool = False,
    **adapter_options,
) -> Denoiser:
    """A randomly initialised Denoiser of ``class_name`` from its transformer ``config``.

    ``on_meta=True`` builds every parameter and buffer on the meta device (no memory, no
    values), for shapes, parameter counts and memory estimates of real-size models.
    """
    cls = _layout_adapter(adapter_class(class_name), config)
    return cls.from_config(config, dtype=dtype, gradient_checkpointing=gradient_checkpointing,
                           on_meta=on_meta, **adapter_options)


def text_encoder_class(path: str | Path) -> type:
    """The encoder class of a text encoder folder, by its config's ``model_type`` (read from
    the config only): a family's (:func:`text_encoders`), else
    :class:`~distill_pl.models.text_encoder.TextEncoder`."""
    entry = text_encoders().get(text_encoder_model_type(path))
    if entry is None:
        return TextEncoder
    module, _, name = entry.partition(":")
    return getattr(importlib.import_module(module), name)


def load_text_encoder(path: str, max_length: int):
    """The encoder of ``path`` padding (and truncating) to ``max_length`` tokens."""
    return text_encoder_class(path)(path, max_length=max_length)


def text_embedding_dim(path: str | Path) -> int:
    """D of the embeddings the folder's encoder gives, from its config only (no weights)."""
    return text_encoder_class(path).folder_dim(str(path))


def text_embedding_recipe(path: str | Path) -> str:
    """How the folder's encoder turns a prompt into the embedding (``student.json``)."""
    return text_encoder_class(path).text_embedding
