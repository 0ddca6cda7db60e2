"""Collapse monitors: diversity and saturation of the student's samples, and a rule that acts.

Every ``every_n_steps`` training steps the callback asks the module for one-step student
samples of the current batch (``pl_module.student_samples(batch, seed)``: pixels
[B, 3, T, H, W] in [-1, 1], from fixed noise; the first ``max_samples`` samples of the batch
when set, which bounds the cost of a check on large batches) and logs:

- ``collapse/diversity``: the per-pixel standard deviation across the batch, averaged
  (0 when every sample is the same video, whatever the prompts and controls);
- ``collapse/saturation``: the fraction of pixel values with ``|x| >= saturation_level``
  (saturated, single-colour videos).

A check is *collapsed* when diversity < ``min_diversity`` or saturation > ``max_saturation``.
After ``patience`` collapsed checks in a row the rule acts (the collapse began at the first of
them): ``action="stop"`` raises :class:`CollapseError`; ``action="rollback"`` loads the newest
checkpoint of the run's ``ModelCheckpoint`` folder written before the collapse began: the
weights of every network in it (the student and, in DMD2, the critic: fake score and
discriminator) and the optimizer states; training goes on from there with the following
steps' data. At most ``max_rollbacks`` rollbacks, then it stops.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import lightning as L
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_warn

from distill_pl.callbacks.module_protocols import StudentSamples, require
from distill_pl.training.base import micro_batch
from distill_pl.training.resume import checkpoint_step


class CollapseError(RuntimeError):
    """The student's samples collapsed (see :mod:`distill_pl.callbacks.collapse`)."""


class CollapseMonitor(L.Callback):
    def __init__(
        self,
        every_n_steps: int = 10,
        min_diversity: float = 0.02,
        max_saturation: float = 0.25,
        saturation_level: float = 0.98,
        patience: int = 3,
        action: Literal["stop", "rollback"] = "stop",
        max_rollbacks: int = 2,
        seed: int = 0,
        max_samples: int | None = None,
    ) -> None:
        if action not in ("stop", "rollback"):
            raise ValueError(f"action must be 'stop' or 'rollback', not {action!r}")
        if max_samples is not None and max_samples < 2:
            raise ValueError(f"max_samples must be >= 2 (diversity is a spread across samples), got {max_samples}")
        self.every_n_steps = every_n_steps
        self.min_diversity = min_diversity
        self.max_saturation = max_saturation
        self.saturation_level = saturation_level
        self.patience = patience
        self.action = action
        self.max_rollbacks = max_rollbacks
        self.seed = seed
        self.max_samples = max_samples
        self.collapsed_since: int | None = None
        self.streak = 0
        self.rollbacks = 0
        self.history: list[tuple[int, float, float]] = []

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":  # it measures training batches
            require(pl_module, StudentSamples, self)

    @torch.no_grad()
    def measure(self, pl_module, batch) -> tuple[float, float]:
        """(diversity, saturation) of the student's samples of ``batch`` (its first ``max_samples``)."""
        if self.max_samples is not None:
            batch = micro_batch(batch, slice(0, self.max_samples))
        # a training batch is still in host memory (the training step moves micro-batches)
        samples = pl_module.student_samples(move_data_to_device(batch, pl_module.device), self.seed).float()
        diversity = float(samples.std(dim=0).mean()) if samples.shape[0] > 1 else float("nan")
        saturation = float((samples.abs() >= self.saturation_level).float().mean())
        return diversity, saturation

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step  # steps done, this one included
        if step % self.every_n_steps:
            return
        was_training = pl_module.training
        pl_module.eval()
        diversity, saturation = self.measure(pl_module, batch)
        pl_module.train(was_training)
        self.history.append((step, diversity, saturation))
        pl_module.log_dict({"collapse/diversity": diversity, "collapse/saturation": saturation},
                           on_step=True, on_epoch=False)
        collapsed = diversity < self.min_diversity or saturation > self.max_saturation
        if not collapsed:
            self.streak, self.collapsed_since = 0, None
            return
        self.streak += 1
        if self.collapsed_since is None:
            self.collapsed_since = step - self.every_n_steps  # the last healthy check
        if self.streak < self.patience:
            return
        what = (f"student samples collapsed at steps {self.collapsed_since + self.every_n_steps}..{step}: "
                f"diversity {diversity:.4f} (min {self.min_diversity}), saturation {saturation:.3f} "
                f"(max {self.max_saturation})")
        if self.action == "stop" or self.rollbacks >= self.max_rollbacks:
            raise CollapseError(f"{what}; stopping" + (f" after {self.rollbacks} rollback(s)" if self.rollbacks else ""))
        path = self._checkpoint_before(trainer, self.collapsed_since)
        if path is None:
            raise CollapseError(f"{what}; no checkpoint from step {self.collapsed_since} or earlier to roll back to")
        self._restore(trainer, pl_module, path)
        self.rollbacks += 1
        self.streak, self.collapsed_since = 0, None
        rank_zero_warn(f"{what}; rolled back the networks and optimizers to {path}")

    @staticmethod
    def _checkpoint_before(trainer, step: int) -> Path | None:
        """The newest intact checkpoint of the run's ModelCheckpoint folders at ``step`` or earlier."""
        found = {}
        for callback in trainer.checkpoint_callbacks:
            if isinstance(callback, ModelCheckpoint) and callback.dirpath and Path(callback.dirpath).is_dir():
                for path in Path(callback.dirpath).glob("*.ckpt"):
                    saved, _ = checkpoint_step(path)
                    if saved is not None and saved <= step:
                        found[path] = (saved, path.stat().st_mtime)
        return max(found, key=found.get) if found else None

    @staticmethod
    def _restore(trainer, pl_module, path: Path) -> None:
        """Every network's weights and every optimizer's state from ``path`` (single-file checkpoint)."""
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        pl_module.on_load_checkpoint(checkpoint)  # puts the frozen networks' weights back
        pl_module.load_state_dict(checkpoint["state_dict"], strict=True)
        for optimizer, state in zip(trainer.optimizers, checkpoint["optimizer_states"]):
            optimizer.load_state_dict(state)
