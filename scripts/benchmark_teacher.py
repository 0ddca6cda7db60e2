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
import time

import lightning as L
import torch

from distill_pl.cli import benchmark_cli



class StepTimer(L.Callback):
    def __init__(self, warmup: int):
        self.warmup = warmup
        self.start = None
        self.steps = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.warmup and self.start is None:
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.start is not None:
            self.steps += 1


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
    elapsed = time.perf_counter() - timer.start
    batch = cli.datamodule.hparams.batch_size
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(f"config: {args.config} (batch {batch})")
    print(f"timed steps: {timer.steps} after {args.warmup} warm-up steps")
    print(f"teacher training: {timer.steps / elapsed:.2f} steps/s, {elapsed / timer.steps:.3f} s/step, "
          f"{timer.steps * batch / elapsed:.1f} clips/s")


if __name__ == "__main__":
    main()
