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

from typing import Mapping

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
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


def lora_scale(module: torch.nn.Module) -> float | None:
    """The scale ``alpha / r`` of ``module``'s adapters (:func:`add_lora` gives every adapted
    layer the same one), or None when it has none."""
    scales = {layer.scaling[ADAPTER] for layer in module.modules() if isinstance(layer, LoraLayer)}
    if len(scales) > 1:
        raise ValueError(f"adapters of several scales {sorted(scales)}: add_lora gives one scale to all")
    return scales.pop() if scales else None


def merged_lora_state(state: dict[str, torch.Tensor], scale: float | None) -> dict[str, torch.Tensor]:
    """The state dict of the plain network that an adapted one computes: each adapted Linear
    ``X`` (keys ``X.base_layer.weight`` [out, in], ``X.lora_A.default.weight`` [r, in],
    ``X.lora_B.default.weight`` [out, r], optional ``X.base_layer.bias``) becomes
    ``X.weight = W + scale * B @ A`` and ``X.bias``; every floating tensor in float32 (a full
    student's export dtype). ``scale`` None: ``state`` has no adapters, returned unchanged."""
    if scale is None:
        return state
    merged: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if f".lora_A.{ADAPTER}." in key or f".lora_B.{ADAPTER}." in key:
            continue
        if ".base_layer." in key:
            layer, _, name = key.partition(".base_layer.")
            if name == "weight":
                a, b = state[f"{layer}.lora_A.{ADAPTER}.weight"], state[f"{layer}.lora_B.{ADAPTER}.weight"]
                value = value.float() + scale * (b.float() @ a.float())
            key = f"{layer}.{name}"
        merged[key] = value.float() if value.is_floating_point() else value
    return merged


def diffusers_lora_state(state: Mapping[str, torch.Tensor], prefix: str, scale: float) -> dict[str, torch.Tensor]:
    """The adapters of ``state`` (an adapted network's state dict, keys as :func:`add_lora`
    makes them) whose keys start with ``prefix``, in the LoRA file layout of diffusers'
    ``load_lora_weights``: each adapted Linear ``prefix + X`` gives ``X.lora_A.weight``
    [r, in] and ``X.lora_B.weight`` [out, r] (float32), where ``X`` is the rest of the module
    path (it must start with the name of the pipeline component that loads the file, e.g.
    ``transformer.blocks.0.attn1.to_q``). ``scale`` (``alpha / r``) is folded into ``B``: a
    file without alphas loads at scale 1 (``B A`` added as it is), so it computes
    ``W + scale * B A`` as the adapted network does. ValueError when ``prefix`` holds no
    adapters."""
    lora: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        for part, factor in ((f".lora_A.{ADAPTER}.", 1.0), (f".lora_B.{ADAPTER}.", scale)):
            if key.startswith(prefix) and part in key:
                layer, _, name = key[len(prefix):].partition(part)
                lora[f"{layer}{part.replace(f'{ADAPTER}.', '')}{name}"] = (factor * value.float()).contiguous()
    if not lora:
        raise ValueError(f"no LoRA adapters under {prefix or 'the state dict'!r}")
    return lora
