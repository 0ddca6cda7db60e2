#!/usr/bin/env python
"""The smallest number of GPUs that fits each real-size KD and DMD2 config, by GPU size.

For each config and each GPU size (80 GB and 141 GB, taken as GiB as ``estimate-memory``
takes them, with its 10% margin), ``distill-pl estimate-memory`` at micro-batch 1 with the
config's precision and gradient checkpointing, for 1, 2, 4, ... 64 devices: one device
unsharded, then DDP and FSDP2 on each count; the first count where one of them fits is
printed with its peak (the larger of the phases, GiB per GPU). Nothing is allocated and no
weight is read (the estimate builds the networks on the meta device; a teacher folder that
is absent is replaced by its published config). Prints a markdown table:

    .venv/bin/python scripts/memory_table.py [CONFIG ...]   # default: every configs/<real size>/{kd,dmd2}.yaml
"""

from __future__ import annotations

import sys
from pathlib import Path

from distill_pl.scale.memory_estimate import GIB, estimate_memory

REPO = Path(__file__).resolve().parents[1]
GPU_SIZES = (80.0, 141.0)
COUNTS = (1, 2, 4, 8, 16, 32, 64)
REAL_SIZE = ("wan2.1-t2v-1.3b", "wan2.1-t2v-14b", "wan2.2-t2v-a14b", "wan2.2-i2v-a14b", "wan2.2-ti2v-5b",
             "cosmos-transfer2.5-2b")


def smallest_fit(config: str, gpu_gb: float) -> str:
    """``"N GPUs, <sharding>: <peak> GiB"`` for the fewest devices that fit, or what the most gives."""
    for devices in COUNTS:
        for sharding in ("none", "fsdp") if devices > 1 else ("none",):
            estimate = estimate_memory(config, gpu_gb=gpu_gb, devices=devices, micro_batch=1, sharding=sharding)
            if estimate.fits:
                kind = "1 GPU" if devices == 1 else f"{devices} GPUs {'DDP' if sharding == 'none' else 'FSDP2'}"
                return f"{kind}: {estimate.total / GIB:.1f} GiB"
    return f"none up to {COUNTS[-1]} GPUs ({estimate.total / GIB:.1f} GiB with FSDP2)"


def main(argv: list[str]) -> None:
    configs = argv or [f"configs/{folder}/{stage}.yaml" for folder in REAL_SIZE for stage in ("kd", "dmd2")]
    print("| config | " + " | ".join(f"{size:g} GB GPU ({size * 0.9:.1f} GiB usable)" for size in GPU_SIZES) + " |")
    print("|---|" + "---|" * len(GPU_SIZES))
    for config in configs:
        cells = [smallest_fit(str(REPO / config), size) for size in GPU_SIZES]
        print(f"| `{config}` | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
