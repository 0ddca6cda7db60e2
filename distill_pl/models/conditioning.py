"""The conditioning object every denoiser takes."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch
from torch import Tensor


@dataclass
class Conditioning:
    """Text embedding (+ mask), an optional control video and optional conditional frames.

    text_embeds:     [B, L, D] token embeddings of the prompt (padding positions are zero).
    text_mask:       [B, L] bool, True where a token is real; None means all real.
    control:         [B, Cc, T, H, W] control video in the denoiser's space (pixels in [-1, 1],
                     or VAE latents for a latent model); None for a model without control.
    cond_latents:    [B, C, T, H, W] clean latents (the shape of ``x_t``) whose first
                     ``num_cond_frames[b]`` latent frames are given to the model (an earlier
                     chunk's last frames, an input image or video); None: no conditional frames.
    num_cond_frames: [B] long, how many leading latent frames of ``cond_latents`` are given
                     (0: generation from noise alone); set together with ``cond_latents``.

    A denoiser that takes conditional frames (``Denoiser.takes_conditional_frames``) reads the
    given frames from ``cond_latents``, whatever ``x_t`` holds there; the velocity it returns
    on them is not a prediction. Samplers put the path's own velocity there
    (:func:`distill_pl.diffusion.conditional_frames.keep_conditional_frames`) and losses leave
    them out (:meth:`generated_frames`).
    """

    text_embeds: Tensor
    text_mask: Tensor | None = None
    control: Tensor | None = None
    cond_latents: Tensor | None = None
    num_cond_frames: Tensor | None = None

    def __post_init__(self) -> None:
        if (self.cond_latents is None) != (self.num_cond_frames is None):
            raise ValueError("Conditioning: cond_latents and num_cond_frames go together (both or neither)")

    @property
    def batch_size(self) -> int:
        return self.text_embeds.shape[0]

    def _map(self, fn) -> "Conditioning":
        """``fn`` applied to every tensor field (None stays None)."""
        return Conditioning(**{f.name: None if getattr(self, f.name) is None else fn(getattr(self, f.name))
                               for f in fields(self)})

    def to(self, device=None, dtype=None) -> "Conditioning":
        """Move tensors; ``dtype`` applies to floating tensors only (masks and counts keep theirs)."""
        return self._map(lambda t: t.to(device=device, dtype=dtype if t.is_floating_point() else None))

    def with_text(self, text_embeds: Tensor, text_mask: Tensor | None) -> "Conditioning":
        """Same control and conditional frames, other text (e.g. the negative prompt for CFG)."""
        return replace(self, text_embeds=text_embeds, text_mask=text_mask)

    def with_conditional_frames(self, cond_latents: Tensor | None, num_cond_frames: Tensor | None) -> "Conditioning":
        """Same text and control, these conditional frames (None, None: none)."""
        return replace(self, cond_latents=cond_latents, num_cond_frames=num_cond_frames)

    def select(self, index) -> "Conditioning":
        """Rows ``index`` of every tensor (a slice, a list or a bool/long tensor)."""
        return self._map(lambda t: t[index])

    def conditional_frame_mask(self, frames: int, dtype: torch.dtype = torch.float32) -> Tensor | None:
        """[B, 1, frames, 1, 1]: 1 on the given (conditional) latent frames, 0 on the generated
        ones; None without conditional frames."""
        if self.num_cond_frames is None:
            return None
        index = torch.arange(frames, device=self.num_cond_frames.device)
        given = index.view(1, frames) < self.num_cond_frames.view(-1, 1)
        return given.to(dtype).view(-1, 1, frames, 1, 1)

    def generated_frames(self, frames: int, dtype: torch.dtype = torch.float32) -> Tensor | None:
        """[B, 1, frames, 1, 1]: 1 on the latent frames the model generates (the ones a loss
        compares), 0 on the conditional ones; None without conditional frames (all generated)."""
        mask = self.conditional_frame_mask(frames, dtype)
        return None if mask is None else 1 - mask

    @staticmethod
    def cat(items: list["Conditioning"]) -> "Conditioning":
        """Concatenate along the batch (each field must be present in all items or in none)."""

        def join(ts):
            return None if ts[0] is None else torch.cat(ts, dim=0)

        return Conditioning(**{f.name: join([getattr(c, f.name) for c in items]) for f in fields(Conditioning)})
