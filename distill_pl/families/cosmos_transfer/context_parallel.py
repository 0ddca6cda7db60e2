"""Context parallelism for the Cosmos 2.5 models: the context-parallel plans of
``CosmosTransformer3DModel`` (Transfer2.5's base and Predict2.5) and ``CosmosControlNetModel``
(Transfer2.5's control branch), in diffusers' ``_cp_plan`` format, and the self-attention
processor that exchanges tokens under them (see :mod:`distill_pl.models.context_parallel`).

Where the tokens are split. Both models patch-embed their inputs, the condition-mask and
padding-mask channels (and the per-frame timestep's frames) included, into [B, N, D] tokens,
frame-major, then rows, then columns; everything before that stays whole on every rank, so the
masks and conditional frames are split with the tokens they belong to. What reaches the blocks
with a token dimension is split on it, each rank keeping its contiguous ``N / size`` tokens:

- the rotary embedding's output ``(cos, sin)`` [N, head_dim] (dim 0), once per model;
- the first block's ``hidden_states`` [B, N, D] (the later blocks get the split output of the
  one before);
- at every block, ``embedded_timestep`` [B, N, D] and ``temb`` [B, N, 3D] (the per-frame
  timestep expanded over the tokens; a [B, D] embedding of a per-sample timestep has no token
  dimension and passes whole), ``extra_pos_emb`` [B, N, D] (the learnable positional
  embedding, None without one) and, in the ControlNet, ``latents`` [B, N, D] (the patch-embedded
  base input its first block adds);
- the base's output norm takes the split ``embedded_timestep`` and ``temb`` too, and its
  ``proj_out`` output is gathered over the group, so every rank returns the full velocity.

The ControlNet's residuals [B, N, D] come out of its split blocks: each rank's residuals are its
own tokens, the same positions its base blocks hold, so they are added without an exchange.

Only the self-attention (``attn1``) exchanges tokens: :func:`install_self_attention_processors`
gives it :class:`CosmosSelfAttentionProcessor`, which hands diffusers' attention dispatch the
parallel config the engine sets; the cross-attention to the text (and the image context) keeps
diffusers' processor and attends from the rank's queries to every key, with no exchange.
"""

from __future__ import annotations

from diffusers.models._modeling_parallel import ContextParallelInput, ContextParallelOutput
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_cosmos import CosmosAttnProcessor2_0
from torch import Tensor, nn

#: [B, N, D] split over the tokens
_TOKENS = ContextParallelInput(split_dim=1, expected_dims=3, split_output=False)
#: the rotary embedding's (cos, sin), each [N, head_dim], split over the tokens after it runs
_ROTARY = {i: ContextParallelInput(split_dim=0, expected_dims=2, split_output=True) for i in (0, 1)}
#: the per-token inputs every Cosmos block takes besides its hidden states
_BLOCK_INPUTS = {"embedded_timestep": _TOKENS, "temb": _TOKENS, "extra_pos_emb": _TOKENS}

#: the plan of ``CosmosTransformer3DModel`` (see the module docstring)
COSMOS_TRANSFORMER_CP_PLAN = {
    "rope": _ROTARY,
    "transformer_blocks.0": {"hidden_states": _TOKENS},
    "transformer_blocks.*": _BLOCK_INPUTS,
    "norm_out": {"embedded_timestep": _TOKENS, "temb": _TOKENS},
    "proj_out": ContextParallelOutput(gather_dim=1, expected_dims=3),
}
#: the plan of ``CosmosControlNetModel``: its residuals stay split (see the module docstring)
COSMOS_CONTROLNET_CP_PLAN = {
    "rope": _ROTARY,
    "control_blocks.0": {"hidden_states": _TOKENS},
    "control_blocks.*": {**_BLOCK_INPUTS, "latents": _TOKENS},
}


class CosmosSelfAttentionProcessor(CosmosAttnProcessor2_0):
    """diffusers' ``CosmosAttnProcessor2_0`` for a self-attention that honours the engine's
    ``_parallel_config`` (Ulysses: an all-to-all from this rank's tokens to its share of the
    heads and back; ring: key/value blocks around the group) and ``_attention_backend``.

    The same computation: q, k, v [B, H, N, head_dim] from the hidden states [B, N, D], RMS
    norms of q and k, the rotary embedding ``(cos, sin)`` [N, head_dim] on both, attention
    without a mask, the output projection. (diffusers' grouped-query repeat of k and v is the
    identity here: a self-attention has as many key heads as query heads.)"""

    _attention_backend = None
    _parallel_config = None

    def __call__(self, attn: nn.Module, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
                 attention_mask: Tensor | None = None, image_rotary_emb: tuple[Tensor, Tensor] | None = None) -> Tensor:
        if encoder_hidden_states is not None:
            raise ValueError("CosmosSelfAttentionProcessor is for self-attention (no encoder_hidden_states)")
        query, key, value = (
            projection(hidden_states).unflatten(2, (attn.heads, -1)).transpose(1, 2)
            for projection in (attn.to_q, attn.to_k, attn.to_v)
        )
        query, key = attn.norm_q(query), attn.norm_k(key)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, use_real=True, use_real_unbind_dim=-2)
            key = apply_rotary_emb(key, image_rotary_emb, use_real=True, use_real_unbind_dim=-2)
        hidden_states = dispatch_attention_fn(
            query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), attn_mask=attention_mask,
            dropout_p=0.0, is_causal=False, backend=self._attention_backend, parallel_config=self._parallel_config,
        )
        hidden_states = hidden_states.flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](hidden_states))


def install_self_attention_processors(blocks: nn.ModuleList) -> None:
    """Give the self-attention ``attn1`` of each Cosmos block in ``blocks`` its own
    :class:`CosmosSelfAttentionProcessor` (the cross-attention ``attn2`` keeps diffusers')."""
    for block in blocks:
        block.attn1.set_processor(CosmosSelfAttentionProcessor())
