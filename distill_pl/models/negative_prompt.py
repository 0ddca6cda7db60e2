"""The negative-prompt embedding a stage holds for CFG's unconditional branch."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from distill_pl.models.conditioning import Conditioning
from distill_pl.models.guidance import negative_conditioning


class NegativePrompt(nn.Module):
    """Embedding [1, L, D] and mask [1, L] of the negative prompt, kept as non-persistent
    buffers: they follow the module's device and never land in checkpoints (the datamodule
    provides them again at every setup)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("embeds", torch.zeros(0), persistent=False)
        self.register_buffer("mask", torch.zeros(0, dtype=torch.bool), persistent=False)

    def set(self, embeds: Tensor, mask: Tensor) -> None:
        self.embeds = embeds.to(self.embeds.device)
        self.mask = mask.to(self.mask.device)

    def set_from(self, datamodule) -> None:
        """Take it from a datamodule with ``negative_prompt_embedding()``, if there is one."""
        if datamodule is not None and hasattr(datamodule, "negative_prompt_embedding"):
            self.set(*datamodule.negative_prompt_embedding())

    def conditioning(self, cond: Conditioning) -> Conditioning:
        """``cond`` with its text replaced by the negative prompt (same control)."""
        if self.embeds.numel() == 0:
            raise RuntimeError("no negative-prompt embedding: call set_negative_prompt first")
        return negative_conditioning(cond, self.embeds, self.mask)
