"""LoRA adapters (peft) on a :class:`~distill_pl.models.denoiser.Denoiser`: frozen base, trainable adapters.

``add_lora`` injects peft LoRA layers into the denoiser in place
(``peft.inject_adapter_in_model``, not a ``PeftModel`` wrapper): every targeted ``nn.Linear``
becomes a peft ``lora.Linear`` holding the original layer as ``base_layer`` plus
``lora_A.default`` [r, in] and ``lora_B.default`` [out, r], and computes
``base(x) + (alpha / r) * B(A(x))``. Module paths are unchanged (``denoiser.blocks[k]`` is
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

from distill_pl.models.denoiser import Denoiser

ADAPTER = "default"


def add_lora(
    denoiser: Denoiser,
    rank: int,
    alpha: float | None = None,
    target_modules: list[str] | tuple[str, ...] | None = None,
    seed: int = 0,
) -> Denoiser:
    """Freeze ``denoiser`` and inject rank-``rank`` LoRA adapters into ``target_modules``
    (suffixes of module paths; None: the family's ``denoiser.lora_targets``, the Linear layers
    of its blocks) in place; returns ``denoiser``. ``alpha`` (None: ``rank``) scales the update
    by ``alpha / rank``. ``A``'s random init is drawn from ``seed`` alone (the global RNG is
    left as it was), so every process builds the same adapters. peft raises ValueError when
    no module matches ``target_modules``."""
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    denoiser.requires_grad_(False)
    targets = denoiser.lora_targets if target_modules is None else target_modules
    config = LoraConfig(r=rank, lora_alpha=rank if alpha is None else alpha, target_modules=list(targets))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        inject_adapter_in_model(config, denoiser, adapter_name=ADAPTER)
    cast_adapter_dtype(denoiser, ADAPTER)
    return denoiser


def lora_parameters(module: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The LoRA adapter parameters of ``module`` by name (``...lora_A.default.weight`` etc.)."""
    return {name: p for name, p in module.named_parameters() if ".lora_A." in name or ".lora_B." in name}
