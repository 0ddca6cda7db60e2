"""LoRA adapters (peft) on a :class:`~distill_pl.models.wan.WanDenoiser`: frozen base, trainable adapters.

``add_lora`` injects peft LoRA layers into the denoiser's transformer in place
(``peft.inject_adapter_in_model``, not a ``PeftModel`` wrapper): every targeted ``nn.Linear``
becomes a peft ``lora.Linear`` holding the original layer as ``base_layer`` plus
``lora_A.default`` [r, in] and ``lora_B.default`` [out, r], and computes
``base(x) + (alpha / r) * B(A(x))``. Module paths are unchanged (``transformer.blocks[k]`` is
still block ``k``), so block hooks and diffusers' per-block gradient checkpointing work as
before; state-dict keys of targeted layers gain ``base_layer.`` / ``lora_A.default.`` /
``lora_B.default.``.

``B`` starts at zero (peft's default init), so at init the adapted network computes exactly
what the base computes. Every base parameter is frozen; the adapters are float32 whatever the
base dtype (peft's forward casts the input to the adapter dtype and the sum back to the base
output's dtype), so a base held in bfloat16 still trains float32 adapters.
"""

from __future__ import annotations

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.tuners_utils import cast_adapter_dtype

from distill_pl.models.wan import WanDenoiser

#: Linear layers of every Wan transformer block (diffusers' ``WanTransformerBlock``):
#: self-attention ``attn1`` and text cross-attention ``attn2`` (q, k, v, out) and the FFN
#: (``net.0.proj`` in, ``net.2`` out). peft matches a name when a module path ends with it;
#: these names occur only inside ``blocks``.
WAN_BLOCK_LINEARS = ("to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2")
ADAPTER = "default"


def add_lora(
    denoiser: WanDenoiser,
    rank: int,
    alpha: float | None = None,
    target_modules: list[str] | tuple[str, ...] = WAN_BLOCK_LINEARS,
    seed: int = 0,
) -> WanDenoiser:
    """Freeze ``denoiser`` and inject rank-``rank`` LoRA adapters into ``target_modules`` of its
    transformer (in place; returns ``denoiser``). ``alpha`` (None: ``rank``) scales the update
    by ``alpha / rank``. ``A``'s random init is drawn from ``seed`` alone (the global RNG is
    left as it was), so every process builds the same adapters. peft raises ValueError when
    no module matches ``target_modules``."""
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    denoiser.requires_grad_(False)
    config = LoraConfig(r=rank, lora_alpha=rank if alpha is None else alpha, target_modules=list(target_modules))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        inject_adapter_in_model(config, denoiser.transformer, adapter_name=ADAPTER)
    cast_adapter_dtype(denoiser.transformer, ADAPTER)
    return denoiser


def lora_parameters(module: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The LoRA adapter parameters of ``module`` by name (``...lora_A.default.weight`` etc.)."""
    return {name: p for name, p in module.named_parameters() if ".lora_A." in name or ".lora_B." in name}
