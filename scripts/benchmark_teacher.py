#!/usr/bin/env python
"""Teacher training speed: steps per second of configs/tiny/teacher.yaml on this machine.

Builds the model and data from the config exactly as ``distill-pl fit`` does, runs
``--warmup`` steps, then times ``--steps`` training steps (data loading, forward, backward
and optimizer step; no validation, no checkpointing) and prints the figures.

    .venv/bin/python scripts/benchmark_teacher.py --steps 50
"""

from __future__ import annotations

import argparse
import os
import platform

import torch

from distill_pl.scale.benchmarking import StepTimer
from distill_pl.cli.main import benchmark_cli


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/tiny/teacher.yaml")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args()
    cli = benchmark_cli(args.config, args.warmup + args.steps)
    timer = StepTimer(args.warmup)
    cli.trainer.callbacks.append(timer)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    steps = timer.steps["step"]
    elapsed = sum(steps) + sum(timer.gaps)  # training steps and the data loading between them
    batch = cli.datamodule.hparams.batch_size
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(f"config: {args.config} (batch {batch})")
    print(f"timed steps: {len(steps)} after {args.warmup} warm-up steps")
    print(f"teacher training: {len(steps) / elapsed:.2f} steps/s, {elapsed / len(steps):.3f} s/step, "
          f"{len(steps) * batch / elapsed:.1f} clips/s")


if __name__ == "__main__":
    main()
