#!/usr/bin/env python
"""Write the tiny random Wan VACE teacher that configs/tiny-wan-vace/ name (CPU, seconds).

    .venv/bin/python scripts/make_tiny_wan_vace.py --out runs/tiny-wan-vace/teacher

The folder is a ``WanVACEPipeline.save_pretrained`` folder (``model_index.json``,
``transformer/``, ``vae/``, ``scheduler/``; no text encoder: the configs embed prompts with
all-MiniLM-L6-v2, 384 wide). Sizes: a 4-channel ``AutoencoderKLWan`` (x4 in time, x8 in space),
a 2-block ``WanVACETransformer3DModel`` (2 heads x 16, patches 1x2x2, VACE hints after block 0,
``vace_in_channels = 2 x 4 + 8 x 8 = 72``), UniPC with flow shift 3. Weights are random (seed 0),
with the VACE hint projections drawn too (diffusers initialises them to zero, which would make
the control do nothing), so the stages have a control-dependent teacher to distil.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from diffusers import AutoencoderKLWan, WanVACEPipeline, WanVACETransformer3DModel

from distill_pl.diffusion.sampling import build_flow_scheduler

VAE = dict(base_dim=8, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True],
           latents_mean=[0.5, -0.25, 1.0, 0.0], latents_std=[2.0, 0.5, 1.5, 1.0])
TRANSFORMER = dict(
    patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
    text_dim=384, freq_dim=32, ffn_dim=64, num_layers=2, cross_attn_norm=True,
    qk_norm="rms_norm_across_heads", rope_max_seq_len=32, vace_layers=[0], vace_in_channels=72,
)


def write_tiny_wan_vace(out: str | Path, seed: int = 0) -> Path:
    """Write the tiny pipeline folder to ``out`` and return it."""
    torch.manual_seed(seed)
    vae = AutoencoderKLWan(**VAE).eval()
    transformer = WanVACETransformer3DModel(**TRANSFORMER).eval()
    with torch.no_grad():
        for block in transformer.vace_blocks:
            block.proj_out.weight.normal_(0.0, 0.2)
    pipe = WanVACEPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=transformer,
                           scheduler=build_flow_scheduler("unipc", shift=3.0))
    pipe.save_pretrained(out, safe_serialization=True)
    print(f"tiny Wan VACE teacher written to {Path(out).resolve()}")
    return Path(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/tiny-wan-vace/teacher")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    write_tiny_wan_vace(args.out, args.seed)


if __name__ == "__main__":
    main()
