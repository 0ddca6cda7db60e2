"""Exponential moving average of a module's parameters (generator-only EMA)."""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA(nn.Module):
    """Holds ``module``, a frozen copy of the tracked network, updated with
    ``ema = decay * ema + (1 - decay) * param`` after each optimizer step.

    Being a submodule, it lands in the LightningModule's state_dict (prefix
    ``<name>.module.``), so checkpoints and resume include it.
    """

    def __init__(self, model: nn.Module, decay: float = 0.999):
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.module = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module, skip: tuple[str, ...] = ()) -> None:
        """One EMA step toward ``model``'s parameters, except those under the submodules named
        in ``skip`` (e.g. ``("high_noise",)``: an expert whose update was skipped keeps its
        average); buffers are copied."""
        prefixes = tuple(f"{name}." for name in skip)
        for (name, ema_p), p in zip(self.module.named_parameters(), model.parameters()):
            if not name.startswith(prefixes):
                ema_p.lerp_(p.detach().to(ema_p.dtype), 1.0 - self.decay)
        for ema_b, b in zip(self.module.buffers(), model.buffers()):
            ema_b.copy_(b)

    def train(self, mode: bool = True) -> "EMA":
        super().train(mode)
        self.module.eval()  # the average is only ever evaluated
        return self
