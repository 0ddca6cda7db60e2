"""Video autoencoders: the map between pixel videos and the space a denoiser works in.

Videos are [B, 3, T, H, W] in [-1, 1]. A latent model's denoiser sees normalised latents
(zero mean, unit std per channel, as the Wan pipeline feeds its transformer); a pixel-space
model sees the video itself (:class:`PixelSpace`).
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKLWan
from torch import Tensor, nn

from distill_pl.models.loading import find_diffusers_model_folder, parse_dtype, read_config
from distill_pl.util.paths import resolve_path


def latent_grid(frames: int, height: int, width: int, temporal_compression: int,
                spatial_compression: int) -> tuple[int, int, int]:
    """(T', H', W') of the latents of ``frames`` frames of ``height`` x ``width`` pixels:
    ``T' = 1 + (T - 1) // temporal_compression`` (frames past ``1 + k * temporal_compression``
    are dropped), ``H' = H // spatial_compression``, ``W' = W // spatial_compression``."""
    return 1 + (frames - 1) // temporal_compression, height // spatial_compression, width // spatial_compression


class VideoAutoencoder(nn.Module):
    """``encode(video) -> latents`` and ``decode(latents) -> video``.

    video:   [B, 3, T, H, W] in [-1, 1]
    latents: [B, latent_channels, T', H / spatial_compression, W / spatial_compression]
    """

    #: channels of the latents
    latent_channels: int
    #: True when latents are the pixels themselves
    is_pixel_space: bool
    #: frames: T' = 1 + (T - 1) // temporal_compression (1 = every frame kept)
    temporal_compression: int
    #: height and width are divided by this
    spatial_compression: int

    def latent_grid(self, frames: int, height: int, width: int) -> tuple[int, int, int]:
        """(T', H', W') of the latents of ``frames`` frames of ``height`` x ``width`` pixels."""
        return latent_grid(frames, height, width, self.temporal_compression, self.spatial_compression)

    def encode(self, video: Tensor) -> Tensor:
        raise NotImplementedError

    def decode(self, latents: Tensor) -> Tensor:
        raise NotImplementedError


class PixelSpace(VideoAutoencoder):
    """The identity: a pixel-space denoiser works on the video directly (no clamping)."""

    is_pixel_space = True
    temporal_compression = 1
    spatial_compression = 1

    def __init__(self, channels: int = 3) -> None:
        super().__init__()
        self.latent_channels = channels

    def encode(self, video: Tensor) -> Tensor:
        return video

    def decode(self, latents: Tensor) -> Tensor:
        return latents


class WanVAE(VideoAutoencoder):
    """diffusers' ``AutoencoderKLWan`` from a local folder, frozen and in eval mode.

    ``path`` is the VAE folder or a pipeline root with ``vae/`` (safetensors only, never the
    hub). ``encode`` takes the posterior mode and normalises it per channel,
    ``(z - latents_mean) / latents_std``; ``decode`` undoes that exactly as ``WanPipeline``
    does before ``vae.decode`` and returns the video clamped to [-1, 1]. Causal in time:
    T frames -> ``1 + (T - 1) // 4`` latent frames (frames past ``1 + 4k`` are dropped),
    H and W divided by 8 (for the Wan 2.1 VAE; the factors come from the VAE config).
    Outputs have the dtype of the input; the VAE runs in ``dtype``, also inside an autocast
    region (bf16-mixed training), which is switched off around it: the memory estimate counts
    the VAE in ``dtype``, and autocast's bf16 convolutions take ~60x as long as float32 ones on
    a CPU without bf16 kernels.
    """

    is_pixel_space = False

    def __init__(self, path: str, dtype: str = "float32") -> None:
        super().__init__()
        folder = find_diffusers_model_folder(path, "AutoencoderKLWan", "vae")
        self.vae = AutoencoderKLWan.from_pretrained(
            folder, local_files_only=True, use_safetensors=True, torch_dtype=parse_dtype(dtype)
        )
        self.vae.requires_grad_(False).eval()
        config = self.vae.config
        self.latent_channels = config.z_dim
        self.temporal_compression = config.scale_factor_temporal
        self.spatial_compression = config.scale_factor_spatial
        shape = (1, config.z_dim, 1, 1, 1)
        mean, std = torch.tensor(config.latents_mean), torch.tensor(config.latents_std)
        self.register_buffer("latents_mean", mean.view(shape), persistent=False)
        self.register_buffer("latents_std", std.view(shape), persistent=False)

    def train(self, mode: bool = True) -> "WanVAE":
        """The VAE stays in eval mode whatever the parent module does."""
        super().train(mode)
        self.vae.eval()
        return self

    def encode(self, video: Tensor) -> Tensor:
        with _without_autocast(video):
            latents = self.vae.encode(video.to(self.vae.dtype)).latent_dist.mode()
        return self._normalised(latents, video.dtype)

    def encode_sample(self, video: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """As :meth:`encode`, with a draw of the VAE posterior in place of its mode: ``mean +
        std * n``, ``n`` from ``generator`` (torch's global RNG without one), as diffusers'
        pipelines encode with ``retrieve_latents(vae.encode(video), generator)``."""
        with _without_autocast(video):
            latents = self.vae.encode(video.to(self.vae.dtype)).latent_dist.sample(generator)
        return self._normalised(latents, video.dtype)

    def _normalised(self, latents: Tensor, dtype: torch.dtype) -> Tensor:
        return ((latents.float() - self.latents_mean) / self.latents_std).to(dtype)

    def decode(self, latents: Tensor) -> Tensor:
        raw = latents.float() * self.latents_std + self.latents_mean
        with _without_autocast(latents):
            video = self.vae.decode(raw.to(self.vae.dtype)).sample
        return video.clamp(-1.0, 1.0).to(latents.dtype)


def _without_autocast(x: Tensor) -> torch.autocast:
    """A region where autocast is off on ``x``'s device (layers run in their weights' dtype)."""
    return torch.autocast(device_type=x.device.type, enabled=False)


def build_autoencoder(path: str | None, dtype: str = "float32") -> VideoAutoencoder:
    """``WanVAE(path, dtype)`` for a local VAE or pipeline folder; ``None``: ``PixelSpace()``."""
    return PixelSpace() if path is None else WanVAE(path, dtype)


def autoencoder_config(path: str) -> dict:
    """The config of the VAE of a local VAE or pipeline folder (``vae/config.json`` or its
    own ``config.json``; no weight is read), or diffusers' ``AutoencoderKLWan`` defaults (the
    Wan 2.1 VAE) when the folder has neither."""
    root = resolve_path(path)
    for file in (root / "vae" / "config.json", root / "config.json"):
        if file.is_file():
            return read_config(file)
    with torch.device("meta"):
        return {k: v for k, v in AutoencoderKLWan().config.items() if not k.startswith("_")}


def empty_autoencoder(config: dict, dtype: str) -> nn.Module:
    """The ``AutoencoderKLWan`` of ``config`` on the meta device (shapes, no memory), its
    parameters in ``dtype``."""
    with torch.device("meta"):
        model = AutoencoderKLWan.from_config(config)
    return model if dtype == "float32" else model.to(parse_dtype(dtype))
