"""DMD2 with gradient accumulation on 2 CPU processes (DDP, gloo, forked from pytest).

Slow (each run forks its processes): deselected by default, run with ``-m slow``.
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.strategies import DDPStrategy
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel

from distill_pl.training.dmd2 import DMD2Module
from tests.training.test_dmd2 import FAST, dm, teacher_dir, tensors, trainer  # noqa: F401

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]
NETWORKS = ("student", "fake_score", "discriminator")
#: indices of the gradient buckets DDP all-reduced since the last training step (per process)
REDUCED_BUCKETS: list[int] = []


def counting_allreduce(process_group, bucket):
    REDUCED_BUCKETS.append(bucket.index())
    return default_hooks.allreduce_hook(process_group, bucket)


class RankLog(L.Callback):
    """Appends each step's loss and all-reduced buckets to ``<folder>/rank<r>.jsonl``."""

    def __init__(self, folder: Path):
        self.folder = folder

    def on_train_start(self, trainer, module):
        # Lightning registers a strategy's ddp_comm_hook on CUDA only
        if isinstance(trainer.strategy.model, DistributedDataParallel):
            trainer.strategy.model.register_comm_hook(None, counting_allreduce)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        metrics = module.step_metrics
        loss = metrics.get("train/generator_loss", metrics.get("train/critic_loss"))
        row = {"step": trainer.global_step - 1, "loss": loss, "buckets": list(REDUCED_BUCKETS)}
        REDUCED_BUCKETS.clear()
        with (self.folder / f"rank{trainer.global_rank}.jsonl").open("a") as f:
            f.write(json.dumps(row) + "\n")


def rank_log(folder: Path, rank: int) -> list[dict]:
    return [json.loads(line) for line in (folder / f"rank{rank}.jsonl").read_text().splitlines()]


def fit(teacher_dir, dm, folder: Path, devices: int, batch_size: int, micro_batches: int) -> DMD2Module:
    """4 steps (student_update_freq 2: critic, student, critic, student); the returned module
    holds rank 0's final weights."""
    folder.mkdir()
    dm.hparams.batch_size = batch_size
    module = DMD2Module(str(teacher_dir), student_update_freq=2, accumulate_micro_batches=micro_batches, **FAST)
    strategy = "auto"
    if devices > 1:  # the critic and student steps use disjoint parameters: unused ones each step
        strategy = DDPStrategy(start_method="fork", find_unused_parameters=True)
    trainer(4, [RankLog(folder)], devices=devices, strategy=strategy).fit(module, datamodule=dm)
    return module


def test_two_ranks_of_two_micro_batches_match_one_process_and_reduce_once_per_step(teacher_dir, dm, tmp_path):
    """2 ranks x batch 2 in 2 micro-batches vs 1 process x batch 4: per step the mean of the
    ranks' losses is the single process's loss and the final weights agree (the draws are
    keyed by global sample index); every gradient bucket is all-reduced once per optimizer
    step (no_sync around the first micro-batch)."""
    single = fit(teacher_dir, dm, tmp_path / "single", devices=1, batch_size=4, micro_batches=1)
    ddp = fit(teacher_dir, dm, tmp_path / "ddp", devices=2, batch_size=2, micro_batches=2)
    one, ranks = rank_log(tmp_path / "single", 0), [rank_log(tmp_path / "ddp", r) for r in (0, 1)]
    for step in range(4):
        mean = (ranks[0][step]["loss"] + ranks[1][step]["loss"]) / 2
        assert mean == pytest.approx(one[step]["loss"], rel=1e-5), step
        for rank in ranks:
            buckets = rank[step]["buckets"]
            assert buckets and len(buckets) == len(set(buckets)), (step, buckets)
    for net in NETWORKS:
        a, b = tensors(getattr(single, net)), tensors(getattr(ddp, net))
        for key, value in a.items():
            if f"{net}.{key}" == "discriminator.conv.bias":  # gradients ~1e-8, where AdamW's update
                continue  # lr * g / (|g| + 1e-8) magnifies rounding (tests/training/test_dmd2_accumulation.py)
            torch.testing.assert_close(b[key], value, rtol=0, atol=1e-5, msg=f"{net}.{key}")
