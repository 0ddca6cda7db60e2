"""The text encoder of a folder, picked by its ``config.json``'s ``model_type``.

A Qwen2.5-VL folder (``model_type == "qwen2_5_vl"``, Cosmos 2.5's text encoder) gives a
:class:`~distill_pl.models.cosmos_text_encoder.CosmosTextEncoder` (normalised hidden states of
every layer, concatenated; not zero at padding); any other transformers model a
:class:`~distill_pl.models.text_encoder.TextEncoder` (last hidden state, zero at padding).
Both have ``encode(prompts) -> (embeds [N, L, D] float32, mask [N, L] bool)`` and ``dim``.
"""

from __future__ import annotations

from pathlib import Path

from distill_pl.models.text_encoder import TextEncoder, _load_config, _model_folder, text_encoder_dim

#: ``model_type`` of Cosmos 2.5's text encoder
COSMOS_MODEL_TYPE = "qwen2_5_vl"


def is_cosmos_text_encoder(path: str | Path) -> bool:
    """Whether the folder's config is a Qwen2.5-VL (read from its config only)."""
    return _load_config(_model_folder(path)).model_type == COSMOS_MODEL_TYPE


def load_text_encoder(path: str, max_length: int):
    """The encoder of ``path`` padding (and truncating) to ``max_length`` tokens."""
    if is_cosmos_text_encoder(path):
        from distill_pl.models.cosmos_text_encoder import CosmosTextEncoder

        return CosmosTextEncoder(path, max_length=max_length)
    return TextEncoder(path, max_length=max_length)


def embedding_dim(path: str | Path) -> int:
    """D of the embeddings the folder's encoder gives, from its config only (no weights)."""
    if is_cosmos_text_encoder(path):
        from distill_pl.models.cosmos_text_encoder import cosmos_text_encoder_dim

        return cosmos_text_encoder_dim(str(path))
    return text_encoder_dim(path)
