"""Find diffusers model folders on the local disk, with errors that say what is wrong.

Only local folders are loaded, never the Hugging Face hub: a string such as
``Wan-AI/Wan2.1-T2V-1.3B-Diffusers`` that is not a folder on disk is an error, not a download.
A path may be a model folder (``config.json`` + ``*.safetensors``) or a pipeline root that
holds the model in a subfolder (``transformer/``, ``vae/``); ``pkg://module/sub`` paths
point inside installed packages (see :func:`distill_pl.util.paths.resolve_path`).
Also :func:`parse_dtype`, for the dtype names that loaders take from config files, and
:func:`cast_parameters`, the dtype cast of a model built from a config as ``from_pretrained`` casts.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from distill_pl.util.paths import resolve_path

#: weight files diffusers can write besides safetensors; named in the error when found
_OTHER_WEIGHT_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.ckpt")


class ModelFolderError(ValueError):
    """A path does not hold the expected diffusers model (the message names the folder)."""


def find_diffusers_model_folder(path: str, class_name: str, subfolder: str) -> Path:
    """Return the folder that holds the ``class_name`` model of ``path``.

    ``path`` is either the model folder itself (its ``config.json`` has
    ``"_class_name": class_name``) or a pipeline root with the model in ``subfolder``.
    Raises :class:`ModelFolderError` if the folder does not exist, has no ``config.json``,
    the config is not JSON or names another class, or there are no ``*.safetensors`` weights.
    """
    root = resolve_path(path)
    if not root.is_dir():
        raise ModelFolderError(
            f"{root}: model folder does not exist. Only local diffusers folders are loaded "
            "(never from the Hugging Face hub); download the model and give its local path."
        )
    folder = root
    if not (root / "config.json").is_file() and (root / subfolder).is_dir():
        folder = root / subfolder
    _check_config(folder, class_name, subfolder)
    _check_weights(folder)
    return folder


def _check_config(folder: Path, class_name: str, subfolder: str) -> None:
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ModelFolderError(
            f"{folder}: no config.json; expected a diffusers {class_name} folder "
            f"or a pipeline folder with {subfolder}/config.json"
        )
    try:
        config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ModelFolderError(f"{folder}: config.json is not valid JSON ({error})") from error
    found = config.get("_class_name") if isinstance(config, dict) else None
    if found != class_name:
        raise ModelFolderError(
            f"{folder}: config.json describes {found!r} (its _class_name), expected {class_name!r}"
        )


def _check_weights(folder: Path) -> None:
    files = sorted(folder.glob("*.safetensors"))
    if files:
        for file in files:
            check_safetensors_file(file)
        return
    others = sorted(p.name for pattern in _OTHER_WEIGHT_PATTERNS for p in folder.glob(pattern))
    if others:
        raise ModelFolderError(
            f"{folder}: only {', '.join(others)}; safetensors weights are required "
            "(re-save the model with save_pretrained(..., safe_serialization=True))"
        )
    raise ModelFolderError(f"{folder}: no *.safetensors weights")


def check_safetensors_file(file: Path) -> None:
    """Raise :class:`ModelFolderError` naming ``file`` when its safetensors header does not
    describe the file (a truncated or torn copy); only the header is read."""
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="pt"):
            pass
    except Exception as error:  # SafetensorError (a Rust exception), OSError
        lines = str(error).strip().splitlines()
        raise ModelFolderError(
            f"{file}: unreadable safetensors weights ({lines[0][:200] if lines else type(error).__name__}); "
            "a truncated or torn copy? copy or export the model folder again"
        ) from None


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(name: str) -> torch.dtype:
    """``"float32"``, ``"bfloat16"`` or ``"float16"`` as a torch dtype (config files use names)."""
    if name not in _DTYPES:
        raise ValueError(f"dtype {name!r} is not one of {sorted(_DTYPES)}")
    return _DTYPES[name]


#: the pipeline component (and teacher subfolder) that holds the denoising transformer
TRANSFORMER_COMPONENT = "transformer"


def transformer_config_file(path: str | Path) -> Path:
    """The transformer's ``config.json`` of a folder (``transformer/config.json`` or its own),
    found without looking at weights (ModelFolderError naming the folder if there is none)."""
    root = resolve_path(path)
    for file in (root / TRANSFORMER_COMPONENT / "config.json", root / "config.json"):
        if file.is_file():
            return file
    raise ModelFolderError(f"{root}: no {TRANSFORMER_COMPONENT}/config.json or config.json")


def read_config(file: Path) -> dict:
    """A diffusers ``config.json`` without its ``_`` keys (ModelFolderError naming it if unreadable)."""
    return {k: v for k, v in read_json(file).items() if not k.startswith("_")}


def read_json(file: Path) -> dict:
    """A JSON object file (ModelFolderError naming it if unreadable or not an object)."""
    try:
        data = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ModelFolderError(f"{file}: not valid JSON ({error})") from error
    if not isinstance(data, dict):
        raise ModelFolderError(f"{file}: not a JSON object")
    return data


def cast_parameters(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Cast parameters to ``dtype`` except ``_keep_in_fp32_modules``, as ``from_pretrained`` does.

    Buffers (the float32 RoPE tables) are left alone, as ``from_pretrained`` leaves them.
    """
    keep = model._keep_in_fp32_modules or []
    for name, param in model.named_parameters():
        if not any(module in name.split(".") for module in keep):
            param.data = param.data.to(dtype)
