#!/usr/bin/env python
"""Write tiny random Wan 2.2 pipeline folders (CPU, seconds): the layouts of Wan2.2-T2V-A14B,
Wan2.2-I2V-A14B and Wan2.2-TI2V-5B at toy sizes.

    .venv/bin/python scripts/make_tiny_wan22.py --kind t2v-a14b --out runs/tiny-wan22-t2v-a14b/teacher

Each folder is the pipeline's own ``save_pretrained`` folder (``model_index.json``,
``transformer/``, ``vae/``, ``scheduler/``; no text encoder: prompts are embedded 384 wide, as
all-MiniLM-L6-v2 gives them):

- ``t2v-a14b``: ``WanPipeline`` with two experts ``transformer/`` (high noise) and
  ``transformer_2/`` (low noise) of one architecture and different random weights,
  ``boundary_ratio`` 0.875 (the published T2V value), the 4-channel Wan 2.1-type VAE (x4 in
  time, x8 in space), UniPC with flow shift 3;
- ``i2v-a14b``: ``WanImageToVideoPipeline``, the same with ``boundary_ratio`` 0.9 and experts
  that take the first-frame condition on channels (``in_channels`` = 4 latent + 4 mask + 4
  condition latent = 12), no image encoder;
- ``ti2v-5b``: ``WanPipeline`` with ``expand_timesteps`` and one transformer, a Wan 2.2-type
  VAE (residual blocks, pixels patched 2x2 onto 12 channels: x16 in space, 4 latent channels),
  UniPC with flow shift 5 (the published TI2V value); ``WanImageToVideoPipeline`` built from
  the same components is its image-to-video pipeline.

Transformers: 2 blocks, 2 heads x 16, patches 1x2x2, text 384 wide; weights random (seed).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from diffusers import AutoencoderKLWan, WanImageToVideoPipeline, WanPipeline, WanTransformer3DModel

from distill_pl.diffusion.sampling import build_flow_scheduler

KINDS = ("t2v-a14b", "i2v-a14b", "ti2v-5b")
LATENT_CHANNELS = 4
VAE_2_1 = dict(base_dim=8, z_dim=LATENT_CHANNELS, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
               temperal_downsample=[False, True, True],
               latents_mean=[0.5, -0.25, 1.0, 0.0], latents_std=[2.0, 0.5, 1.5, 1.0])
#: the Wan 2.2 VAE's layout: residual down/up blocks, 2x2 pixel patches (3 x 4 = 12 channels)
VAE_2_2 = dict(VAE_2_1, base_dim=12, is_residual=True, in_channels=12, out_channels=12, patch_size=2,
               scale_factor_spatial=16)
TRANSFORMER = dict(
    patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=LATENT_CHANNELS,
    out_channels=LATENT_CHANNELS, text_dim=384, freq_dim=32, ffn_dim=64, num_layers=2, cross_attn_norm=True,
    qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
)
#: boundary_ratio of the published two-expert pipelines
BOUNDARY = {"t2v-a14b": 0.875, "i2v-a14b": 0.9}


def tiny_wan22_pipeline(kind: str, seed: int = 0):
    """The tiny pipeline of ``kind`` (one of :data:`KINDS`), its weights drawn from ``seed``."""
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; expected one of {', '.join(KINDS)}")
    torch.manual_seed(seed)
    if kind == "ti2v-5b":
        vae = AutoencoderKLWan(**VAE_2_2).eval()
        transformer = WanTransformer3DModel(**TRANSFORMER).eval()
        return WanPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=transformer,
                           scheduler=build_flow_scheduler("unipc", shift=5.0), expand_timesteps=True)
    vae = AutoencoderKLWan(**VAE_2_1).eval()
    in_channels = 2 * LATENT_CHANNELS + vae.config.scale_factor_temporal if kind == "i2v-a14b" else LATENT_CHANNELS
    high, low = (WanTransformer3DModel(**dict(TRANSFORMER, in_channels=in_channels)).eval() for _ in range(2))
    components = dict(tokenizer=None, text_encoder=None, vae=vae, transformer=high, transformer_2=low,
                      scheduler=build_flow_scheduler("unipc", shift=3.0), boundary_ratio=BOUNDARY[kind])
    if kind == "i2v-a14b":
        return WanImageToVideoPipeline(image_encoder=None, image_processor=None, **components)
    return WanPipeline(**components)


def write_tiny_wan22(out: str | Path, kind: str, seed: int = 0) -> Path:
    """Write the tiny pipeline folder of ``kind`` to ``out`` and return it."""
    tiny_wan22_pipeline(kind, seed).save_pretrained(out, safe_serialization=True)
    print(f"tiny Wan 2.2 {kind} teacher written to {Path(out).resolve()}")
    return Path(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kind", choices=KINDS, required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    write_tiny_wan22(args.out, args.kind, args.seed)


if __name__ == "__main__":
    main()
