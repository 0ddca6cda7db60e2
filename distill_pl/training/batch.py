"""From a data batch to what a Denoiser takes: latents and a Conditioning.

A batch holds pixels (``video``, ``control`` [B, 3, T, H, W] in [-1, 1]) that the autoencoder
encodes here, or latents precomputed with it (``video_latents``, ``control_latents``
[B, C, T', H', W'], ``data.mode: latents``), used as they are.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from distill_pl.diffusion.conditional_frames import DEFAULT_CONDITIONAL_FRAME_PROBABILITIES, check_probabilities
from distill_pl.models.autoencoder import VideoAutoencoder
from distill_pl.models.conditioning import Conditioning
from distill_pl.models.denoiser import Denoiser


@torch.no_grad()
def batch_conditioning(batch: dict, autoencoder: VideoAutoencoder, denoiser: Denoiser) -> Conditioning:
    """Text (+ mask) of a batch and its control video [B, 3, T, H, W] (pixels in [-1, 1])
    turned into what ``denoiser`` takes as control (``denoiser.encode_control``: by default
    encoded with the same autoencoder as the clips; None for a model without control).
    Precomputed ``control_latents`` (the VAE latents of the control video) are used without
    encoding, for a denoiser whose control is exactly those latents (the default
    ``encode_control``); a family that builds its own control from the pixels is refused."""
    if "control_latents" in batch and denoiser.control_channels:
        if type(denoiser).encode_control is not Denoiser.encode_control:
            raise ValueError(
                f"data.mode latents: {type(denoiser).__name__} builds its own control input from "
                "the control video (encode_control), so precomputed control latents cannot feed "
                "it; use data.mode clips"
            )
        control = batch["control_latents"].float()
    else:
        control = denoiser.encode_control(batch["control"].float(), autoencoder)
    return Conditioning(batch["text_embeds"].float(), batch["text_mask"], control)


@torch.no_grad()
def encode_clip_batch(
    batch: dict, autoencoder: VideoAutoencoder, denoiser: Denoiser
) -> tuple[Tensor, Conditioning]:
    """``batch`` from VideoDataModule (clips or latents mode) -> (x0 latents [B, C, T', H', W'], cond)."""
    return clip_latents(batch, autoencoder), batch_conditioning(batch, autoencoder, denoiser)


@torch.no_grad()
def clip_latents(batch: dict, autoencoder: VideoAutoencoder) -> Tensor:
    """x0 latents [B, C, T', H', W'] of the batch's clips: the precomputed ``video_latents``,
    else the encoded ``video``."""
    if "video_latents" in batch:
        return batch["video_latents"].float()
    return autoencoder.encode(batch["video"])


def clip_latent_shape(batch: dict, autoencoder: VideoAutoencoder, channels: int) -> tuple[int, ...]:
    """[B, channels, T', H', W'] of the batch's clip latents (``channels``: the denoiser's),
    without encoding anything."""
    if "video_latents" in batch:
        return tuple(batch["video_latents"].shape)
    b, _, t, h, w = batch["video"].shape
    return (b, channels, *autoencoder.latent_grid(t, h, w))


@torch.no_grad()
def batch_pixels(batch: dict, name: str, autoencoder: VideoAutoencoder) -> Tensor:
    """``video`` or ``control`` pixels [B, 3, T, H, W] of a batch, decoded from the
    precomputed ``<name>_latents`` when the batch has no pixels (monitoring grids)."""
    if name in batch:
        return batch[name]
    return autoencoder.decode(batch[f"{name}_latents"].float())


def conditional_frame_probabilities(denoiser: Denoiser, probabilities: Sequence[float] | None) -> tuple[float, ...]:
    """How often a run gives 0, 1, 2, ... leading latent frames of each sample as conditional
    frames: ``probabilities`` when given, else the default
    (:data:`~distill_pl.diffusion.conditional_frames.DEFAULT_CONDITIONAL_FRAME_PROBABILITIES`)
    for a model that takes conditional frames and ``()`` (none drawn) for one that does not.
    ``[1.0]`` turns them off. ValueError for other probabilities given to a model without them."""
    if probabilities is None:
        return DEFAULT_CONDITIONAL_FRAME_PROBABILITIES if denoiser.takes_conditional_frames else ()
    check_probabilities(probabilities)
    probabilities = tuple(float(p) for p in probabilities)
    if probabilities == (1.0,):
        return ()
    if not denoiser.takes_conditional_frames:
        raise ValueError(
            f"conditional_frame_probabilities {list(probabilities)}: {type(denoiser).__name__} takes no "
            "conditional frames (leave the setting out)"
        )
    return probabilities


def give_first_frames(cond: Conditioning, clean: Tensor, counts: Tensor) -> Conditioning:
    """``cond`` with the first ``counts[b]`` latent frames of the clean latents ``clean``
    [B, C, T', H', W'] given as conditional frames, each count capped at T' - 1 (a sample
    always generates a frame)."""
    counts = counts.to(device=clean.device, dtype=torch.long).clamp(max=clean.shape[2] - 1)
    return cond.with_conditional_frames(clean, counts)


def drop_text(cond: Conditioning, null: Conditioning, p: float, generator=None,
              drop: Tensor | None = None) -> Conditioning:
    """Replace each sample's text by the null (negative-prompt) text with probability ``p``.

    Trains the unconditional branch that classifier-free guidance needs. ``drop``: the
    per-sample decisions [B] (bool) drawn beforehand (:func:`draw_text_drop`), else drawn here.
    """
    if p <= 0:
        return cond
    b = cond.batch_size
    if drop is None:
        drop = draw_text_drop(b, p, generator)
    drop = drop.to(cond.text_embeds.device)
    d3 = drop.view(b, 1, 1)
    embeds = torch.where(d3, null.text_embeds, cond.text_embeds)
    mask = None
    if cond.text_mask is not None and null.text_mask is not None:
        mask = torch.where(drop.view(b, 1), null.text_mask, cond.text_mask)
    return cond.with_text(embeds, mask)


def draw_text_drop(batch_size: int, p: float, generator=None) -> Tensor:
    """The per-sample text-dropout decisions [B] (bool, on the CPU) of :func:`drop_text`."""
    return torch.rand(batch_size, generator=generator) < p


def check_precomputed_latents(datamodule, vae_path: str | None) -> None:
    """ValueError naming the key unless the datamodule's precomputed latents (if it serves
    any: ``latents_metadata``) were made with the VAE at ``vae_path``."""
    metadata = getattr(datamodule, "latents_metadata", None)
    if metadata is not None:
        from distill_pl.data.clip_latents import check_latents_match

        check_latents_match(metadata, vae_path)
