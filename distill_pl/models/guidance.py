"""Bind a Denoiser and its conditioning into a velocity function, with optional CFG."""

from __future__ import annotations

import torch
from torch import Tensor

from distill_pl.diffusion.conditional_frames import keep_conditional_frames
from distill_pl.diffusion.flow import classifier_free_guidance
from distill_pl.models.conditioning import Conditioning
from distill_pl.models.denoiser import Denoiser


def negative_conditioning(cond: Conditioning, embeds: Tensor, mask: Tensor | None) -> Conditioning:
    """The unconditional branch: the negative-prompt embedding ([1, L, D] or [B, L, D])
    broadcast to the batch, with the SAME control as ``cond``."""
    b = cond.batch_size
    embeds = embeds.to(cond.text_embeds).expand(b, *embeds.shape[1:])
    if mask is not None:
        mask = mask.to(cond.text_embeds.device).expand(b, *mask.shape[1:])
    return cond.with_text(embeds, mask)


def check_guidance_2(denoiser: Denoiser, guidance_2: float | None, key: str = "guidance_2") -> None:
    """ValueError naming the setting ``key`` when ``guidance_2`` (the low-noise expert's CFG
    weight) is set for a denoiser of one network (``Denoiser.low_noise_levels`` is None)."""
    if guidance_2 is not None and denoiser.low_noise_levels(torch.ones(1, dtype=torch.float64)) is None:
        raise ValueError(f"{key}={guidance_2:g}: the low-noise expert's CFG weight needs a two-expert teacher "
                         f"(a folder with transformer_2/ and boundary_ratio); {type(denoiser).__name__} is one "
                         f"network: leave {key} unset (null)")


def uses_cfg(guidance: float, guidance_2: float | None = None) -> bool:
    """Whether CFG at ``guidance`` (and ``guidance_2`` at a two-expert model's low-noise
    levels) needs the unconditional branch: False only when every weight is 1
    (``u + 1 (c - u) = c``)."""
    return guidance != 1.0 or guidance_2 not in (None, 1.0)


def velocity_fn(
    denoiser: Denoiser,
    cond: Conditioning,
    uncond: Conditioning | None = None,
    guidance: float = 1.0,
    guidance_2: float | None = None,
):
    """``fn(x_t, sigma) -> v`` with CFG ``u + w (c - u)`` when ``guidance != 1``.

    Both branches run in one batched call. ``guidance_2``: the weight ``w`` at the levels a
    two-expert denoiser hands to its low-noise expert (``Denoiser.low_noise_levels``; the
    pipelines' ``guidance_scale_2``), ``guidance`` at the others; None: ``guidance``
    everywhere. ValueError for ``guidance_2`` with a denoiser of one network.
    """
    check_guidance_2(denoiser, guidance_2)
    if not uses_cfg(guidance, guidance_2):
        return lambda x_t, sigma: denoiser(x_t, sigma, cond)

    branches = branch_velocities(denoiser, cond, uncond)

    def guided(x_t: Tensor, sigma: Tensor) -> Tensor:
        v_cond, v_uncond = branches(x_t, sigma)
        if guidance_2 is None:
            return classifier_free_guidance(v_uncond, v_cond, guidance)
        low = denoiser.low_noise_levels(sigma).view(-1, *[1] * (x_t.ndim - 1))
        weight = torch.where(low, guidance_2, guidance).to(v_cond.dtype)
        return classifier_free_guidance(v_uncond, v_cond, weight)

    return guided


def sampling_velocity_fn(
    denoiser: Denoiser,
    noise: Tensor,
    cond: Conditioning,
    uncond: Conditioning | None = None,
    guidance: float = 1.0,
    guidance_2: float | None = None,
):
    """:func:`velocity_fn` (``guidance_2`` as there) for a sampler started from ``noise`` [B, C, T, H, W]: on the
    conditional frames of ``cond`` (if any) the velocity is ``noise - cond.cond_latents``, the
    straight path to the given latents (:func:`keep_conditional_frames`); without conditional
    frames, :func:`velocity_fn` itself."""
    fn = velocity_fn(denoiser, cond, uncond, guidance, guidance_2)
    if cond.cond_latents is None:
        return fn
    mask = cond.conditional_frame_mask(noise.shape[2], noise.dtype)
    return keep_conditional_frames(fn, noise, cond.cond_latents, mask)


def branch_velocities(denoiser: Denoiser, cond: Conditioning, uncond: Conditioning | None):
    """``fn(x_t, sigma) -> (v_cond, v_uncond)``, the two CFG branches in one batched call
    (ValueError without the unconditional conditioning)."""
    if uncond is None:
        raise ValueError("guidance != 1 needs the unconditional (negative) conditioning")
    both = Conditioning.cat([cond, uncond])

    def branches(x_t: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
        v = denoiser(x_t.repeat(2, *[1] * (x_t.ndim - 1)), sigma.repeat(2), both)
        v_cond, v_uncond = v.chunk(2)
        return v_cond, v_uncond

    return branches
