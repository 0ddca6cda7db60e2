"""The conditioning image of Wan 2.2's image-to-video models, as ``WanImageToVideoPipeline``
builds it (``prepare_latents``), without an image encoder.

The image [B, 3, H, W] in [-1, 1] is the video's first frame, at the video's own size (the
pipeline resizes it; here a wrong size is an error). ``k`` is the VAE's temporal factor, ``z``
its latent channels.

- A14B (:func:`first_frame_condition`): the video ``[image, 0, ..., 0]`` of T frames through
  the VAE (posterior mode, normalised ``(z - mean) / std``) -> [B, z, T', H', W'], after ``k``
  mask channels that are 1 on the first latent frame and 0 elsewhere: [B, k + z, T', H', W'],
  concatenated to the noisy latents on channels (``in_channels = 2 z + k``, 36 for Wan 2.2).
- TI2V (:func:`first_frame_latent`): the image alone through the VAE -> [B, z, 1, H', W'], the
  clean first latent frame.
"""

from __future__ import annotations

import torch
from torch import Tensor

from distill_pl.models.autoencoder import VideoAutoencoder


def first_frame_condition(image: Tensor, num_frames: int, height: int, width: int,
                          autoencoder: VideoAutoencoder) -> Tensor:
    """[B, k + z, T', H', W']: the first-frame mask and the latents of ``[image, 0, ..., 0]``
    for a video of ``num_frames`` frames of ``height`` x ``width`` pixels."""
    check_image(image, height, width)
    batch = image.shape[0]
    video = torch.cat([image[:, :, None], image.new_zeros(batch, 3, num_frames - 1, height, width)], dim=2)
    latents = autoencoder.encode(video)
    mask = torch.zeros(batch, autoencoder.temporal_compression, *latents.shape[2:], dtype=latents.dtype,
                       device=latents.device)
    mask[:, :, 0] = 1.0
    return torch.cat([mask, latents], dim=1)


def first_frame_latent(image: Tensor, height: int, width: int, autoencoder: VideoAutoencoder) -> Tensor:
    """[B, z, 1, H', W']: the latent frame of ``image`` alone."""
    check_image(image, height, width)
    return autoencoder.encode(image[:, :, None])


def check_image(image: Tensor, height: int, width: int) -> None:
    """ValueError unless ``image`` is [B, 3, height, width]."""
    if image.ndim != 4 or image.shape[1] != 3 or tuple(image.shape[2:]) != (height, width):
        raise ValueError(f"the conditioning image must be [B, 3, {height}, {width}] (the video's first frame, "
                         f"at the video's size), got {list(image.shape)}")
