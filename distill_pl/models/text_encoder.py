"""A frozen Hugging Face text encoder loaded from a local folder.

``encode`` follows Wan's pipeline for umT5: tokens padded to ``max_length`` and truncated,
``last_hidden_state`` of the encoder, positions past the prompt's tokens set to zero.
Encoder-decoder models (T5, mT5, umT5) are loaded encoder-only.

The folder is a ``save_pretrained`` folder (``config.json``, weights, tokenizer files), or a
``pkg://module/sub`` path (see :mod:`distill_pl.util.paths`). In the diffusers layout, where the
tokenizer sits in a sibling ``tokenizer/`` folder, that sibling is used. Nothing is ever
downloaded (``local_files_only=True``).
"""

from __future__ import annotations

from pathlib import Path

import torch
import transformers
from torch import Tensor

from distill_pl.util.paths import resolve_path

#: encoder-only classes for encoder-decoder model types; others use ``AutoModel(...).get_encoder()``
ENCODER_CLASSES = {"t5": "T5EncoderModel", "mt5": "MT5EncoderModel", "umt5": "UMT5EncoderModel"}
_TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "spiece.model", "vocab.txt")


def _model_folder(path: str | Path) -> Path:
    """The resolved folder of a transformers model; FileNotFoundError naming it if it is not one."""
    folder = resolve_path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"text encoder folder {folder} does not exist")
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"text encoder folder {folder} has no config.json: not a transformers model folder"
        )
    return folder


def _load_config(folder: Path) -> transformers.PretrainedConfig:
    try:
        return transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, KeyError) as err:
        raise ValueError(
            f"text encoder folder {folder}: config.json is not a transformers config ({err})"
        ) from err


def text_encoder_dim(path: str | Path) -> int:
    """Hidden size D of the encoder in ``path``, read from its config only (no weights)."""
    return int(_load_config(_model_folder(path)).hidden_size)


def text_encoder_model_type(path: str | Path) -> str:
    """The transformers ``model_type`` of the encoder in ``path``, from its config only."""
    return _load_config(_model_folder(path)).model_type


def _tokenizer_folder(folder: Path) -> Path:
    """``folder`` itself, or the diffusers sibling ``../tokenizer`` when ``folder`` has none."""
    if any((folder / name).is_file() for name in _TOKENIZER_FILES):
        return folder
    sibling = folder.parent / "tokenizer"
    return sibling if sibling.is_dir() else folder


class TextEncoder:
    """Tokenizer + encoder of a local transformers model, frozen, in eval mode.

    Args:
        path: model folder or ``pkg://`` path.
        max_length: L, the padded (and truncated) token length.
        device: where the encoder runs (CPU by default).
    """

    #: how the prompt becomes the embedding (``student.json``'s ``text_embedding``)
    text_embedding = (
        "last_hidden_state of the tokens (padding='max_length', truncation=True, max_length="
        "max_text_length, add_special_tokens=True), float32, set to 0 where the attention mask is 0"
    )
    #: D of a folder's embeddings, from its config only
    folder_dim = staticmethod(text_encoder_dim)

    def __init__(self, path: str, max_length: int = 64, device: str | torch.device = "cpu"):
        self.path = path
        self.max_length = max_length
        self.device = torch.device(device)
        folder = _model_folder(path)
        config = _load_config(folder)
        try:
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(
                _tokenizer_folder(folder), local_files_only=True
            )
            self.model = self._load_encoder(folder, config)
        except (OSError, ValueError, KeyError) as err:
            raise ValueError(f"text encoder folder {folder}: cannot load ({err})") from err
        self.model.requires_grad_(False).eval().to(self.device)

    @staticmethod
    def _load_encoder(folder: Path, config: transformers.PretrainedConfig) -> torch.nn.Module:
        kwargs = dict(config=config, local_files_only=True, dtype=torch.float32)
        if not config.is_encoder_decoder:
            return transformers.AutoModel.from_pretrained(folder, **kwargs)
        class_name = ENCODER_CLASSES.get(config.model_type)
        if class_name is not None:
            return getattr(transformers, class_name).from_pretrained(folder, **kwargs)
        return transformers.AutoModel.from_pretrained(folder, **kwargs).get_encoder()

    @property
    def dim(self) -> int:
        """D, the hidden size of the embeddings."""
        return int(self.model.config.hidden_size)

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """Embed ``prompts``.

        Returns:
            embeds: [N, L, D] float32 on CPU, zero at padded positions.
            mask:   [N, L] bool on CPU, True at real tokens (special tokens included).
        """
        tokens = self.tokenizer(
            list(prompts),
            padding="max_length",
            max_length=self.max_length,
            truncation=True,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        ids = tokens["input_ids"].to(self.device)
        mask = tokens["attention_mask"].to(self.device)
        hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
        mask = mask.bool()
        embeds = hidden.float() * mask.unsqueeze(-1)
        return embeds.cpu(), mask.cpu()
