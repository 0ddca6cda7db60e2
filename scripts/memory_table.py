#!/usr/bin/env python
"""The smallest number of GPUs that fits each real-size KD and DMD2 config, by GPU size.

For each row (a config, and the model settings it changes, if any) and each GPU size (80 GB
and 141 GB, taken as GiB as ``estimate-memory`` takes them, with its 10% margin),
``distill-pl estimate-memory`` at micro-batch 1 with the config's precision and gradient
checkpointing, for 1, 2, 4, ... 64 devices: one device unsharded, then DDP and FSDP2 on each
count (a config with ``context_parallel``: FSDP2 only, on the counts its group size divides); the first count where one of them fits is printed with its peak (the larger of the
phases, GiB per GPU), beside the memory settings of the row. Nothing is allocated and no
weight is read (the estimate builds the networks on the meta device; a teacher folder that
is absent is replaced by its published config). Prints a markdown table:

    .venv/bin/python scripts/memory_table.py [CONFIG ...]   # default: ROWS
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import yaml

from distill_pl.models.context_parallel import ContextParallel
from distill_pl.scale.memory_estimate import GIB, estimate_memory

REPO = Path(__file__).resolve().parents[1]
GPU_SIZES = (80.0, 141.0)
COUNTS = (1, 2, 4, 8, 16, 32, 64)
REAL_SIZE = ("wan2.1-t2v-1.3b", "wan2.1-t2v-14b", "wan2.2-t2v-a14b", "wan2.2-i2v-a14b", "wan2.2-ti2v-5b",
             "cosmos-transfer2.5-2b")
#: (config, model settings changed from the config's): the shipped KD and DMD2 configs, the
#: 8-GPU Wan2.1-14B DMD2 configs, and LoRA students where they change the count (the two-expert
#: Wan 2.2 A14B: LoRA adapters on both experts of student and fake score)
ROWS = [
    *((f"configs/{folder}/{stage}.yaml", {}) for folder in REAL_SIZE for stage in ("kd", "dmd2")),
    ("configs/wan2.1-t2v-14b/dmd2_8gpu.yaml", {}),
    ("configs/wan2.1-t2v-14b/dmd2_8gpu.yaml", {"student_lora_rank": 64}),
    ("configs/wan2.1-t2v-14b/dmd2_8gpu_cp.yaml", {}),
    ("configs/wan2.1-t2v-1.3b/dmd2.yaml", {"student_lora_rank": 64, "fake_score_lora_rank": 64}),
    ("configs/cosmos-transfer2.5-2b/dmd2.yaml", {"student_lora_rank": 64, "fake_score_lora_rank": 64}),
    ("configs/wan2.2-t2v-a14b/dmd2.yaml", {"student_lora_rank": 64, "fake_score_lora_rank": 64}),
    ("configs/wan2.2-i2v-a14b/dmd2.yaml", {"student_lora_rank": 64, "fake_score_lora_rank": 64}),
]


def settings(config: dict) -> str:
    """The row's memory settings: precision, checkpointing, the LoRA networks, context parallel."""
    model = config["model"]["init_args"]
    parts = [str(config["trainer"].get("precision", "32-true")),
             "checkpointing" if model.get("gradient_checkpointing") else "no checkpointing"]
    parts += [f"LoRA {name} r{model[f'{key}_lora_rank']}" for key, name in (("student", "student"),
                                                                          ("fake_score", "fake score"))
              if model.get(f"{key}_lora_rank")]
    cp = ContextParallel.from_setting(model.get("context_parallel"))
    if cp is not None:
        parts.append(f"context parallel ulysses {cp.ulysses} x ring {cp.ring}")
    return ", ".join(parts)


def smallest_fits(config: str) -> dict[float, str]:
    """GPU size -> ``"N GPUs <sharding>: <peak> GiB"`` for the fewest devices that fit, or what
    the most gives (the peak does not depend on the GPU size: one estimate serves both)."""
    fits: dict[float, str] = {}
    cp = ContextParallel.from_setting(yaml.safe_load(Path(config).read_text())["model"]["init_args"]
                                      .get("context_parallel"))
    for devices in COUNTS:
        if cp is not None and devices % cp.size:
            continue
        # FSDP2 first: where it does not fit, DDP (which holds everything FSDP2 shards) does not
        # either; where it does, DDP is preferred if it fits too
        estimates = {"none" if devices == 1 else "fsdp": estimate_memory(
            config, devices=devices, micro_batch=1, sharding="none" if devices == 1 else "fsdp")}
        if devices > 1 and cp is None and any(_fits(estimates["fsdp"], size) for size in GPU_SIZES if size not in fits):
            estimates["none"] = estimate_memory(config, devices=devices, micro_batch=1, sharding="none")
        for sharding in ("none", "fsdp"):
            estimate = estimates.get(sharding)
            for size in GPU_SIZES:
                if estimate is not None and size not in fits and _fits(estimate, size):
                    kind = "1 GPU" if devices == 1 else f"{devices} GPUs {'DDP' if sharding == 'none' else 'FSDP2'}"
                    fits[size] = f"{kind}: {estimate.total / GIB:.1f} GiB"
        if len(fits) == len(GPU_SIZES):
            return fits
        estimate = estimates.get("fsdp", estimates.get("none"))
    return {size: fits.get(size, f"none up to {COUNTS[-1]} GPUs ({estimate.total / GIB:.1f} GiB with FSDP2)")
            for size in GPU_SIZES}


def _fits(estimate, size: float) -> bool:
    return estimate.total <= size * (1 - estimate.margin) * GIB


def main(argv: list[str]) -> None:
    rows = [(config, {}) for config in argv] or ROWS
    print("| config | settings | " + " | ".join(f"{size:g} GB GPU ({size * 0.9:.1f} GiB usable)"
                                             for size in GPU_SIZES) + " |")
    print("|---|---|" + "---|" * len(GPU_SIZES))
    with tempfile.TemporaryDirectory() as folder:
        for index, (config, changes) in enumerate(rows):
            parsed = yaml.safe_load((REPO / config).read_text())
            parsed["model"]["init_args"].update(changes)
            path = REPO / config
            if changes:  # the config with the row's settings, beside nothing it names (paths are cwd-relative)
                path = Path(folder) / f"{index}.yaml"
                path.write_text(yaml.safe_dump(parsed))
            fits = smallest_fits(str(path))
            name = f"`{config}`" + "".join(f" + `{k}: {v}`" for k, v in changes.items())
            print(f"| {name} | {settings(parsed)} | " + " | ".join(fits[size] for size in GPU_SIZES) + " |", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
