"""From a data batch to what a Denoiser takes: latents and a Conditioning."""

from __future__ import annotations

import torch
from torch import Tensor

from distill_pl.models.autoencoder import VideoAutoencoder
from distill_pl.models.conditioning import Conditioning
from distill_pl.models.denoiser import Denoiser


@torch.no_grad()
def batch_conditioning(batch: dict, autoencoder: VideoAutoencoder, denoiser: Denoiser) -> Conditioning:
    """Text (+ mask) of a batch and its control video [B, 3, T, H, W] (pixels in [-1, 1])
    turned into what ``denoiser`` takes as control (``denoiser.encode_control``: by default
    encoded with the same autoencoder as the clips; None for a model without control)."""
    control = denoiser.encode_control(batch["control"].float(), autoencoder)
    return Conditioning(batch["text_embeds"].float(), batch["text_mask"], control)


@torch.no_grad()
def encode_clip_batch(
    batch: dict, autoencoder: VideoAutoencoder, denoiser: Denoiser
) -> tuple[Tensor, Conditioning]:
    """``batch`` from VideoDataModule (clips mode) -> (x0 latents [B, C, T', H', W'], cond)."""
    return autoencoder.encode(batch["video"]), batch_conditioning(batch, autoencoder, denoiser)


def drop_text(cond: Conditioning, null: Conditioning, p: float, generator=None) -> Conditioning:
    """Replace each sample's text by the null (negative-prompt) text with probability ``p``.

    Trains the unconditional branch that classifier-free guidance needs.
    """
    if p <= 0:
        return cond
    b = cond.batch_size
    drop = (torch.rand(b, generator=generator) < p).to(cond.text_embeds.device)
    d3 = drop.view(b, 1, 1)
    embeds = torch.where(d3, null.text_embeds, cond.text_embeds)
    mask = None
    if cond.text_mask is not None and null.text_mask is not None:
        mask = torch.where(drop.view(b, 1), null.text_mask, cond.text_mask)
    return cond.with_text(embeds, mask)
