"""The conditioning object every denoiser takes."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor


@dataclass
class Conditioning:
    """Text embedding (+ mask) and an optional control video for a batch.

    text_embeds: [B, L, D] token embeddings of the prompt (padding positions are zero).
    text_mask:   [B, L] bool, True where a token is real; None means all real.
    control:     [B, Cc, T, H, W] control video in the denoiser's space (pixels in [-1, 1],
                 or VAE latents for a latent model); None for a model without control.
    """

    text_embeds: Tensor
    text_mask: Tensor | None = None
    control: Tensor | None = None

    @property
    def batch_size(self) -> int:
        return self.text_embeds.shape[0]

    def to(self, device=None, dtype=None) -> "Conditioning":
        """Move tensors; ``dtype`` applies to floating tensors only (the mask stays bool)."""

        def move(t: Tensor | None) -> Tensor | None:
            if t is None:
                return None
            return t.to(device=device, dtype=dtype if t.is_floating_point() else None)

        return Conditioning(move(self.text_embeds), move(self.text_mask), move(self.control))

    def with_text(self, text_embeds: Tensor, text_mask: Tensor | None) -> "Conditioning":
        """Same control, other text (e.g. the negative prompt for the CFG branch)."""
        return replace(self, text_embeds=text_embeds, text_mask=text_mask)

    def select(self, index) -> "Conditioning":
        """Rows ``index`` of every tensor (a slice, a list or a bool/long tensor)."""
        pick = lambda t: None if t is None else t[index]  # noqa: E731
        return Conditioning(pick(self.text_embeds), pick(self.text_mask), pick(self.control))

    @staticmethod
    def cat(items: list["Conditioning"]) -> "Conditioning":
        """Concatenate along the batch (masks and controls must be all present or all None)."""

        def join(ts):
            return None if ts[0] is None else torch.cat(ts, dim=0)

        return Conditioning(
            join([c.text_embeds for c in items]),
            join([c.text_mask for c in items]),
            join([c.control for c in items]),
        )
