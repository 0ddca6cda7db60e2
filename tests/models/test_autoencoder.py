"""WanVAE against diffusers' AutoencoderKLWan and the WanPipeline normalisation (tiny VAE)."""

import pytest
import torch
from diffusers import AutoencoderKLWan

from distill_pl.models.autoencoder import PixelSpace, WanVAE, build_autoencoder

MEAN = [0.5, -0.25, 1.0, 0.0]
STD = [2.0, 0.5, 1.5, 1.0]


@pytest.fixture(scope="module")
def tiny_vae_folder(tmp_path_factory):
    """A pipeline root holding vae/ with a random 4-channel AutoencoderKLWan (x4 time, x8 space)."""
    torch.manual_seed(0)
    vae = AutoencoderKLWan(
        base_dim=8,
        z_dim=4,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
        latents_mean=MEAN,
        latents_std=STD,
    ).eval()
    root = tmp_path_factory.mktemp("pipeline")
    vae.save_pretrained(root / "vae", safe_serialization=True)
    return root, vae


def video(frames=5, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(1, 3, frames, size, size, generator=g) * 2 - 1


def test_encode_decode_shapes(tiny_vae_folder):
    root, _ = tiny_vae_folder
    autoencoder = WanVAE(str(root))
    assert (autoencoder.latent_channels, autoencoder.is_pixel_space) == (4, False)
    assert (autoencoder.temporal_compression, autoencoder.spatial_compression) == (4, 8)
    latents = autoencoder.encode(video(frames=5))
    assert latents.shape == (1, 4, 2, 2, 2)  # 1 + (5 - 1) // 4 frames, 16 / 8 pixels
    decoded = autoencoder.decode(latents)
    assert decoded.shape == (1, 3, 5, 16, 16)
    assert decoded.abs().max() <= 1.0


def test_normalisation_matches_wan_pipeline(tiny_vae_folder):
    root, vae = tiny_vae_folder
    autoencoder = WanVAE(str(root / "vae"))
    x = video()
    mean = torch.tensor(MEAN).view(1, 4, 1, 1, 1)
    std = torch.tensor(STD).view(1, 4, 1, 1, 1)
    with torch.no_grad():
        expected = (vae.encode(x).latent_dist.mode() - mean) / std
        latents = autoencoder.encode(x)
        torch.testing.assert_close(latents, expected)
        # WanPipeline: latents_std = 1 / std; latents = latents / latents_std + latents_mean
        pipeline_video = vae.decode(latents / (1.0 / std) + mean).sample
        torch.testing.assert_close(autoencoder.decode(latents), pipeline_video.clamp(-1, 1))


def test_frozen_and_stays_in_eval(tiny_vae_folder):
    autoencoder = WanVAE(str(tiny_vae_folder[0]))
    torch.nn.Sequential(autoencoder).train()
    assert autoencoder.training and not autoencoder.vae.training
    assert not any(p.requires_grad for p in autoencoder.parameters())


def test_pixel_space_is_identity_and_build(tiny_vae_folder):
    pixels = build_autoencoder(None)
    assert isinstance(pixels, PixelSpace) and pixels.is_pixel_space and pixels.latent_channels == 3
    x = video()
    assert pixels.encode(x) is x and pixels.decode(x) is x
    assert isinstance(build_autoencoder(str(tiny_vae_folder[0])), WanVAE)


def test_runs_in_its_own_dtype_inside_bf16_autocast(tiny_vae_folder):
    """bf16-mixed training wraps the VAE in autocast; it still encodes and decodes in float32."""
    root, _ = tiny_vae_folder
    autoencoder = WanVAE(str(root))
    x = video()
    with torch.no_grad():
        latents, decoded = autoencoder.encode(x), autoencoder.decode(autoencoder.encode(x))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            latents_mixed = autoencoder.encode(x)
            decoded_mixed = autoencoder.decode(latents_mixed)
            sampled_mixed = autoencoder.encode_sample(x, torch.Generator().manual_seed(0))
        sampled = autoencoder.encode_sample(x, torch.Generator().manual_seed(0))
    assert torch.equal(latents_mixed, latents) and torch.equal(decoded_mixed, decoded)
    assert torch.equal(sampled_mixed, sampled)
