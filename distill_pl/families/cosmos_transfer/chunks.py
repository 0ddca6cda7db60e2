"""Long videos as ``Cosmos2_5_TransferPipeline`` generates them: auto-regressive chunks.

A video of T frames is cut into chunks of ``frames_per_chunk`` (F) frames that overlap by
``num_ar_conditional_frames`` (A) frames: chunk k covers frames ``[k (F - A), k (F - A) + F)``
(the last one cut at T; its control video padded with its last frame to F). The first chunk is
generated from noise alone; each later chunk is conditioned on the previous one: the previous
chunk's latents are decoded, its last A frames put first in an otherwise black (-1) video of F
frames, that video encoded (posterior mean), and its first ``n = (A - 1) // tc + 1`` latent
frames given as conditional frames (``Conditioning.cond_latents`` / ``num_cond_frames``). The
video's latents are the first chunk's followed by each later chunk's latents without their n
conditional frames, cut to the ``(T - 1) // tc + 1`` latent frames of T frames.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor

from distill_pl.diffusion.conditional_frames import frames_of_pixels
from distill_pl.diffusion.sampling import sample_with_scheduler, student_sample
from distill_pl.models.autoencoder import VideoAutoencoder
from distill_pl.models.conditioning import Conditioning
from distill_pl.models.denoiser import Denoiser
from distill_pl.models.guidance import negative_conditioning, sampling_velocity_fn

#: ``(noise [B, C, t, H, W], cond) -> latents [B, C, t, H, W]``: one chunk sampled from its
#: initial noise; ``cond`` holds the text, the chunk's control latents and its conditional frames
ChunkSampler = Callable[[Tensor, Conditioning], Tensor]


def chunk_spans(num_frames: int, frames_per_chunk: int, num_ar_conditional_frames: int) -> list[tuple[int, int]]:
    """``[(start, end), ...]``: the frames of each chunk, as the pipeline cuts them."""
    if not 0 <= num_ar_conditional_frames < frames_per_chunk:
        raise ValueError(
            f"num_ar_conditional_frames {num_ar_conditional_frames} must be in 0..frames_per_chunk - 1 "
            f"({frames_per_chunk - 1})"
        )
    stride = frames_per_chunk - num_ar_conditional_frames
    return [(start, min(start + frames_per_chunk, num_frames))
            for start in range(0, num_frames - num_ar_conditional_frames, stride)]


def pad_or_trim(video: Tensor, frames: int) -> Tensor:
    """``video`` [B, C, T, H, W] cut to ``frames`` frames, or padded with copies of its last."""
    if video.shape[2] >= frames:
        return video[:, :, :frames]
    pad = video[:, :, -1:].expand(-1, -1, frames - video.shape[2], -1, -1)
    return torch.cat([video, pad], dim=2)


@torch.no_grad()
def sample_in_chunks(
    sample_chunk: ChunkSampler,
    denoiser: Denoiser,
    autoencoder: VideoAutoencoder,
    cond: Conditioning,
    control_video: Tensor,
    noises: Sequence[Tensor],
    frames_per_chunk: int,
    num_ar_conditional_frames: int = 1,
) -> Tensor:
    """The latents [B, C, (T - 1) // tc + 1, H, W] of a video of T frames generated chunk by
    chunk (see the module notes). ``cond``: the text (its control and conditional frames are
    replaced per chunk); ``control_video`` [B, 3, T, H, W] in [-1, 1], encoded per chunk with
    ``denoiser.encode_control``; ``noises``: one initial noise [B, C, t, H', W'] per chunk (t
    the latent frames of ``frames_per_chunk``); the pipeline called with ``latents=`` uses the
    same noise for every chunk."""
    spans = chunk_spans(control_video.shape[2], frames_per_chunk, num_ar_conditional_frames)
    if len(noises) != len(spans):
        raise ValueError(f"a video of {control_video.shape[2]} frames is {len(spans)} chunks of "
                         f"{frames_per_chunk}; got {len(noises)} noises")
    tc = autoencoder.temporal_compression
    given = frames_of_pixels(num_ar_conditional_frames, tc)
    chunks, previous = [], None
    for k, (start, end) in enumerate(spans):
        control = denoiser.encode_control(pad_or_trim(control_video[:, :, start:end], frames_per_chunk), autoencoder)
        chunk_cond = replace_control(cond, control)
        if previous is not None:
            video = torch.full_like(previous, -1.0)
            if num_ar_conditional_frames:
                video[:, :, :num_ar_conditional_frames] = previous[:, :, -num_ar_conditional_frames:]
            counts = torch.full((video.shape[0],), given, dtype=torch.long, device=video.device)
            chunk_cond = chunk_cond.with_conditional_frames(autoencoder.encode(video), counts)
        latents = sample_chunk(noises[k], chunk_cond)
        chunks.append(latents if previous is None else latents[:, :, given:])
        previous = autoencoder.decode(latents)
    latent_frames = (control_video.shape[2] - 1) // tc + 1
    return torch.cat(chunks, dim=2)[:, :, :latent_frames]


def replace_control(cond: Conditioning, control: Tensor) -> Conditioning:
    """``cond`` with this control and no conditional frames."""
    return Conditioning(cond.text_embeds, cond.text_mask, control)


def teacher_chunk_sampler(
    teacher: Denoiser, negative: tuple[Tensor, Tensor | None], guidance: float, scheduler, num_steps: int
) -> ChunkSampler:
    """A chunk sampled by the teacher: ``num_steps`` steps of ``scheduler`` with CFG weight
    ``guidance`` (``u + w (c - u)``; ``negative``: the negative prompt's embedding and mask),
    evaluated where the family's pipeline evaluates (``teacher.sampler_sigma``)."""

    def sample(noise: Tensor, cond: Conditioning) -> Tensor:
        uncond = negative_conditioning(cond, *negative) if guidance != 1.0 else None
        fn = sampling_velocity_fn(teacher, noise, cond, uncond, guidance)
        return sample_with_scheduler(fn, noise.clone(), scheduler, num_steps, step_sigma=teacher.sampler_sigma)

    return sample


def student_chunk_sampler(
    student: Denoiser, noise_levels: Sequence[float] = (1.0,), sampler: str = "renoise",
    generator: torch.Generator | None = None,
) -> ChunkSampler:
    """A chunk sampled by a K-step student at ``noise_levels`` (no CFG) with its ``sampler``."""

    def sample(noise: Tensor, cond: Conditioning) -> Tensor:
        return student_sample(sampling_velocity_fn(student, noise, cond), noise, noise_levels, sampler, generator)

    return sample
