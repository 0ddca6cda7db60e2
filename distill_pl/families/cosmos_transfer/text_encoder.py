"""Cosmos 2.5's text embeddings: normalised Qwen2.5-VL hidden states, concatenated over layers.

``encode`` follows ``Cosmos2_5_TransferPipeline._get_prompt_embeds``: each prompt is wrapped
in the pipeline's two-turn chat (a fixed system message, then the prompt as the user turn),
tokenised with the tokenizer's chat template (no generation prompt), padded to ``max_length``
and truncated; the language model runs on the token ids alone (no attention mask, as the
pipeline calls it; it is causal, so padding after the prompt does not change the prompt's
positions); the hidden states of every decoder layer (``hidden_states[1:]``, not the input
embeddings) are each normalised over the feature axis, ``(h - mean) / (std + 1e-8)`` with the
unbiased std, and concatenated: D = hidden_size x num_hidden_layers (100352 for the 7B
Qwen2.5-VL of Cosmos-Transfer2.5). Padding positions keep their hidden states (they are not
zeroed: the pipeline feeds them to the transformer too).

The folder is a transformers ``Qwen2_5_VLForConditionalGeneration`` folder (the pipeline's
``text_encoder/``), with the tokenizer in it or in the diffusers sibling ``tokenizer/``;
nothing is downloaded.
"""

from __future__ import annotations

import torch
import transformers
from torch import Tensor

from distill_pl.models.loading import parse_dtype
from distill_pl.models.text_encoder import _load_config, _model_folder, _tokenizer_folder

#: the system turn ``Cosmos2_5_TransferPipeline`` puts before every prompt
SYSTEM_PROMPT = "You are a helpful assistant who will provide prompts to an image generator."
#: ``model_type`` of the configs this encoder reads
MODEL_TYPE = "qwen2_5_vl"


def cosmos_text_encoder_dim(path: str) -> int:
    """D = hidden_size x num_hidden_layers of the Qwen2.5-VL in ``path``, from its config only."""
    text = _load_config(_model_folder(path)).text_config
    return int(text.hidden_size * text.num_hidden_layers)


def chat(prompt: str) -> list[dict]:
    """The pipeline's conversation for one prompt: system message, then the prompt."""
    return [
        {"role": "system", "content": [{"type": "text", "text": SYSTEM_PROMPT}]},
        {"role": "user", "content": [{"type": "text", "text": prompt}]},
    ]


class CosmosTextEncoder:
    """Tokenizer + Qwen2.5-VL language model of a local folder, frozen, in eval mode.

    Picked for a text encoder folder whose ``model_type`` is :data:`MODEL_TYPE` (this family's
    ``configs.TEXT_ENCODERS``, read by :func:`~distill_pl.families.registry.text_encoders`).

    Args:
        path: the text encoder folder (or ``pkg://`` path).
        max_length: L, the padded (and truncated) token length (the pipeline's
            ``max_sequence_length``, 512 by default).
        device: where the model runs (CPU by default).
        dtype: the model's parameter dtype (``"float32"``, ``"bfloat16"``, ``"float16"``); the
            embeddings are returned as float32.
    """

    #: how the prompt becomes the embedding (``student.json``'s ``text_embedding``)
    text_embedding = (
        "Cosmos2_5_TransferPipeline.encode_prompt: the chat-wrapped prompt through Qwen2.5-VL, "
        "every layer's hidden states normalised and concatenated, max_text_length tokens"
    )
    #: D of a folder's embeddings, from its config only
    folder_dim = staticmethod(cosmos_text_encoder_dim)

    def __init__(
        self,
        path: str,
        max_length: int = 512,
        device: str | torch.device = "cpu",
        dtype: str = "float32",
    ) -> None:
        self.path = path
        self.max_length = max_length
        self.device = torch.device(device)
        folder = _model_folder(path)
        config = _load_config(folder)
        if config.model_type != MODEL_TYPE:
            raise ValueError(
                f"text encoder folder {folder}: model_type {config.model_type!r}, Cosmos 2.5 "
                f"embeddings need a {MODEL_TYPE!r} (Qwen2.5-VL) model"
            )
        try:
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(
                _tokenizer_folder(folder), local_files_only=True
            )
            self.model = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(
                folder, config=config, local_files_only=True, dtype=parse_dtype(dtype)
            )
        except (OSError, ValueError, KeyError) as err:
            raise ValueError(f"text encoder folder {folder}: cannot load ({err})") from err
        if self.tokenizer.chat_template is None:
            raise ValueError(f"text encoder folder {folder}: the tokenizer has no chat template")
        self.model.requires_grad_(False).eval().to(self.device)

    @property
    def dim(self) -> int:
        """D = hidden_size x num_hidden_layers, the width of the concatenated embeddings."""
        text = self.model.config.text_config
        return int(text.hidden_size * text.num_hidden_layers)

    def tokenize(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """Token ids and attention mask, both [N, L] (long), as the pipeline tokenises."""
        rows = [
            self.tokenizer.apply_chat_template(
                chat(prompt),
                tokenize=True,
                add_generation_prompt=False,
                add_vision_id=False,
                max_length=self.max_length,
                truncation=True,
                padding="max_length",
                return_dict=True,
            )
            for prompt in prompts
        ]
        ids = torch.tensor([row["input_ids"] for row in rows], dtype=torch.long)
        mask = torch.tensor([row["attention_mask"] for row in rows], dtype=torch.long)
        return ids, mask

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """Embed ``prompts``.

        Returns:
            embeds: [N, L, D] float32 on CPU (every position, padding included).
            mask:   [N, L] bool on CPU, True at the chat's real tokens (False at padding).
        """
        ids, mask = self.tokenize(list(prompts))
        # logits of the last position only: the hidden states are the same, the vocabulary-wide
        # logits of every position (what the pipeline computes and drops) are not needed
        outputs = self.model(ids.to(self.device), output_hidden_states=True, use_cache=False, logits_to_keep=1)
        hidden = outputs.hidden_states
        layers = [(h - h.mean(dim=-1, keepdim=True)) / (h.std(dim=-1, keepdim=True) + 1e-8) for h in hidden[1:]]
        embeds = torch.cat(layers, dim=-1)
        return embeds.float().cpu(), mask.bool()
