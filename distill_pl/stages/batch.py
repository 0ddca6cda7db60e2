"""From a data batch to what a Denoiser takes: latents and a Conditioning."""

from __future__ import annotations

import torch
from torch import Tensor

from distill_pl.models.autoencoder import VideoAutoencoder
from distill_pl.models.conditioning import Conditioning


@torch.no_grad()
def batch_conditioning(batch: dict, autoencoder: VideoAutoencoder, takes_control: bool = True) -> Conditioning:
    """Text (+ mask) of a batch and its control video, encoded with the same autoencoder as
    the clips (identity in pixel space) so latent models see the control in latent space.
    ``takes_control=False`` (a denoiser without control channels, e.g. Wan2.1 T2V) leaves
    the control out."""
    control = autoencoder.encode(batch["control"].float()) if takes_control else None
    return Conditioning(batch["text_embeds"].float(), batch["text_mask"], control)


@torch.no_grad()
def encode_clip_batch(
    batch: dict, autoencoder: VideoAutoencoder, takes_control: bool = True
) -> tuple[Tensor, Conditioning]:
    """``batch`` from VideoDataModule (clips mode) -> (x0 latents [B, C, T', H', W'], cond)."""
    return autoencoder.encode(batch["video"]), batch_conditioning(batch, autoencoder, takes_control)


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
