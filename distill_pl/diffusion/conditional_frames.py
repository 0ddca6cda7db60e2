"""Conditional latent frames: the leading frames of a clip given clean to the model.

A model of this kind (Cosmos 2.5) generates a clip whose first ``n`` latent frames are given:
an earlier chunk's last frames (long videos), an input image or video. Its sampler keeps those
frames on the straight path from the initial noise to the given latents: on them the velocity
is ``noise - cond_latents`` (as diffusers' Cosmos 2.5 pipelines replace the network's output,
``(noise - cond_latents) * m + v * (1 - m)``, ``m`` the [B, 1, T, 1, 1] conditional-frame mask),
and losses compare the generated frames only.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from distill_pl.diffusion.sampling import VelocityFn

#: how often 0, 1, 2 conditional latent frames are drawn per training sample by default (the
#: Cosmos-Transfer2.5 distillation recipe)
DEFAULT_CONDITIONAL_FRAME_PROBABILITIES = (0.6, 0.2, 0.2)


def keep_conditional_frames(
    velocity_fn: VelocityFn, noise: Tensor, cond_latents: Tensor | None, mask: Tensor | None
) -> VelocityFn:
    """``velocity_fn`` with the velocity on the conditional frames (``mask`` [B, 1, T, 1, 1],
    1 there) replaced by ``noise - cond_latents`` (``noise``: the sampler's initial latents
    [B, C, T, H, W], ``cond_latents`` the given clean latents, same shape); ``velocity_fn``
    itself without a mask (no conditional frames)."""
    if mask is None:
        return velocity_fn
    mask = mask.to(noise.dtype)
    path_velocity = (noise - cond_latents.to(noise.dtype)) * mask

    def fn(x_t: Tensor, sigma: Tensor) -> Tensor:
        return path_velocity + velocity_fn(x_t, sigma) * (1 - mask)

    return fn


def frames_of_pixels(num_pixel_frames: int, temporal_compression: int) -> int:
    """Latent frames that hold the first ``num_pixel_frames`` frames of a video (0 for 0): the
    VAE's first latent frame is the first pixel frame, each next one ``temporal_compression``."""
    return 0 if num_pixel_frames <= 0 else (num_pixel_frames - 1) // temporal_compression + 1


def draw_num_conditional_frames(
    batch: int, probabilities: Sequence[float], generator: torch.Generator | None = None
) -> Tensor:
    """[B] long: a number of conditional latent frames per sample, ``k`` with probability
    ``probabilities[k]`` (they must sum to 1), from ``generator`` (torch's global RNG without)."""
    weights = check_probabilities(probabilities)
    return torch.multinomial(weights, batch, replacement=True, generator=generator)


def check_probabilities(probabilities: Sequence[float]) -> Tensor:
    """``probabilities`` as a float64 tensor; ValueError unless they are >= 0 and sum to 1."""
    weights = torch.tensor([float(p) for p in probabilities], dtype=torch.float64)
    if weights.numel() == 0 or (weights < 0).any() or abs(float(weights.sum()) - 1.0) > 1e-6:
        raise ValueError(
            f"conditional_frame_probabilities {list(probabilities)}: one probability per number of "
            "conditional latent frames (0, 1, ...), each >= 0, summing to 1"
        )
    return weights


def masked_mean(error: Tensor, keep: Tensor | None) -> Tensor:
    """Mean of ``error`` [B, C, T, H, W]: per sample over the elements where ``keep``
    (broadcastable to it, e.g. the generated frames [B, 1, T, 1, 1]) is 1, then over the
    samples, so every sample weighs the same whatever its number of conditional frames (and a
    batch split evenly over data-parallel ranks averages to the same loss); the plain mean when
    ``keep`` is None."""
    if keep is None:
        return error.mean()
    keep = keep.to(error.dtype).expand_as(error)
    per_sample = (error * keep).flatten(1).sum(1) / keep.flatten(1).sum(1).clamp_min(1)
    return per_sample.mean()
