#!/usr/bin/env python
"""Context parallel vs one process for the KD step and the DMD2 critic and generator steps
(:mod:`distill_pl.scale.context_parallel_check`): losses, relative gradient errors, peak memory
and seconds per process, as one JSON file (read by ``scripts/gpu_report.py --context_parallel``).

The ``ulysses * ring`` processes are gloo processes on one device; on CUDA they share the one
GPU (NCCL refuses two ranks on one GPU), so the split's seconds are not a speed-up figure; its
per-process peak shows the activations split over the group. Ring attention needs CUDA and
bf16 (diffusers' cuDNN attention, which returns the log-sum-exp ring merges with).

    .venv/bin/python scripts/check_context_parallel.py --device cpu --tiny --ulysses 2 --json cp.json
    .venv/bin/python scripts/check_context_parallel.py --device cuda --ring 2 --dtype bfloat16 --json cp.json

Without ``--tiny``: the Wan2.1-T2V-1.3B architecture (published config) cut to ``--blocks``
blocks, batch 1, 512 text tokens of 4096, latents ``--latents T H W`` (default 21 30 52: 81
frames at 240x416, 8,190 tokens). ``--family cosmos-transfer``: Cosmos-Transfer2.5 (base and
ControlNet, each with its plan; conditional frames in sample 0) instead: with ``--tiny`` the
tiny one of ``scripts/make_tiny_cosmos_transfer.py``, without it Cosmos-Transfer2.5-2B's
architecture cut to ``--blocks`` base blocks (and the ControlNet to the residuals those take),
512 text tokens of 100352, default latents 24 30 52 (93 frames at 240x416, 9,360 tokens).
A failing run writes ``{"error": ...}`` and exits with 1.
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
#: the tiny Wan of tests/training/test_context_parallel_steps.py: 2 heads x 8, patches (1, 2, 2)
TINY = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=6, out_channels=3,
            text_dim=16, freq_dim=16, ffn_dim=32, num_layers=3)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--ulysses", type=int, default=1)
    parser.add_argument("--ring", type=int, default=1)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--sharding", default="fsdp", choices=["fsdp", "none"])
    parser.add_argument("--family", default="wan", choices=["wan", "cosmos-transfer"])
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--blocks", type=int, default=2)
    parser.add_argument("--latents", type=int, nargs=3, metavar=("T", "H", "W"),
                        help="default: 21 30 52 (Wan), 24 30 52 (Cosmos)")
    parser.add_argument("--json", required=True)
    args = parser.parse_args(argv)

    import torch

    from distill_pl.models.context_parallel import ContextParallel
    from distill_pl.scale.context_parallel_check import run_check

    model, class_name, config, shape, text = (cosmos_case if args.family == "cosmos-transfer" else wan_case)(args)
    setup = dict(model=model, device=args.device, ulysses=args.ulysses, ring=args.ring, dtype=args.dtype,
                 sharding=args.sharding, latents=list(shape), text=list(text))
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        cp = ContextParallel.from_setting({"ulysses": args.ulysses, "ring": args.ring})
        if cp is None:
            raise ValueError("give --ulysses or --ring > 1")
        rows = run_check(out.with_suffix(".rows.json"), [dict(
            cp=cp, class_name=class_name, config=config, shape=shape, text=text,
            device=torch.device(args.device), sharding=args.sharding,
            compute_dtype=None if args.dtype == "float32" else args.dtype)])
        result, code = {**setup, "rows": rows}, 0
    except Exception as error:  # the report shows which combination failed and why
        traceback.print_exc()
        lines = [line for line in str(error).splitlines() if line.strip()]  # a spawned process's: its last line
        result, code = {**setup, "error": lines[-1] if lines else type(error).__name__}, 1
    out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return code


def wan_case(args) -> tuple[str, str, dict, tuple[int, ...], tuple[int, int]]:
    """(model name, class name, config, latent shape, text (L, D)) of the Wan check."""
    from distill_pl.families.wan.configs import WAN_2_1_T2V_1_3B

    if args.tiny:
        return "tiny Wan", "WanTransformer3DModel", TINY, (2, 3, 2, 8, 8), (5, TINY["text_dim"])
    config = {**WAN_2_1_T2V_1_3B, "num_layers": args.blocks}
    shape = (1, config["out_channels"], *(args.latents or (21, 30, 52)))
    model = f"Wan2.1-T2V-1.3B cut to {args.blocks} blocks"
    return model, "WanTransformer3DModel", config, shape, (512, config["text_dim"])


def cosmos_case(args) -> tuple[str, str, dict, tuple[int, ...], tuple[int, int]]:
    """The same for Cosmos-Transfer2.5 (base + ControlNet)."""
    from distill_pl.families.cosmos_transfer.adapter import text_input_dim
    from distill_pl.families.cosmos_transfer.configs import COSMOS_TRANSFER_2_5_2B, TRANSFORMER_CLASS

    if args.tiny:
        from make_tiny_cosmos_transfer import CONTROLNET, LATENT_CHANNELS, TEXT_DIM, TRANSFORMER

        config = {"transformer": TRANSFORMER, "controlnet": CONTROLNET}
        return "tiny Cosmos-Transfer2.5", TRANSFORMER_CLASS, config, (2, LATENT_CHANNELS, 2, 8, 8), (5, TEXT_DIM)
    base, controlnet = COSMOS_TRANSFER_2_5_2B["transformer"], COSMOS_TRANSFER_2_5_2B["controlnet"]
    residuals = len(range(0, args.blocks, base["controlnet_block_every_n"]))
    config = {"transformer": {**base, "num_layers": args.blocks},
              "controlnet": {**controlnet, "n_controlnet_blocks": residuals}}
    shape = (1, base["out_channels"], *(args.latents or (24, 30, 52)))
    model = f"Cosmos-Transfer2.5-2B cut to {args.blocks} blocks ({residuals} ControlNet)"
    return model, TRANSFORMER_CLASS, config, shape, (512, text_input_dim(base))


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.exit(main())
