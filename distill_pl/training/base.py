"""The training loop of every stage (teacher training, KD, DMD2), written once.

:class:`StageModule` is a LightningModule with manual optimization whose one
:meth:`~StageModule.training_step` runs exactly one optimizer step per loaded batch:

1. the stage names the **phase** of this step (:meth:`~StageModule.phase`; DMD2:
   ``global_step % student_update_freq``, critic or generator; KD and the teacher: one phase)
   and, for that phase, the optimizer, the networks whose gradients it steps (named parameter
   groups, for the gradient norms) and the clip value (:meth:`~StageModule.phase_optimizer`);
2. the stage draws the phase's random numbers for the whole batch
   (:meth:`~StageModule.phase_draws`, an object with ``rows(slice)`` or None);
3. the batch is split into ``accumulate_micro_batches`` micro-batches (sizes differing by at
   most one); each is moved to the device only when it runs (a loaded training batch stays
   in host memory, :meth:`~StageModule.transfer_batch_to_device`, so a batch of N
   micro-batches costs the device one micro-batch) and gets its forward
   (:meth:`~StageModule.phase_loss`, a loss that is a mean over samples, so the micro-batch
   losses weighted by their share of the batch sum to the batch loss) and ``manual_backward``; gradients are all-reduced (DDP) or reduce-scattered
   (FSDP2) in the backward of the last micro-batch only;
4. the non-finite policy (:mod:`distill_pl.training.nonfinite`), decided jointly by all ranks:
   a non-finite loss stops the micro-batch loop; a non-finite loss or accumulated gradient
   skips the update: every gradient is set to None and ``optimizer.step()`` is still called,
   so Lightning's step counter, the phase, the data position and the step-keyed randomness
   stay in lockstep while nothing moves. A network of several experts
   (:attr:`~distill_pl.models.denoiser.Denoiser.named_experts`) whose non-finite gradient is
   confined to some experts' parameters has only those experts' gradients set to None: the
   rest of the update (the other experts, the phase's other networks) is applied;
5. clipping of the accumulated gradient (total norm over the phase's networks), the optimizer
   step, the stage's learning-rate scheduler (if it has one) and, after an applied update,
   :meth:`~StageModule.after_update` (the EMA, told which experts' updates were skipped);
6. logging: ``train/<key>`` of the phase's logs and ``train/grad_norm_<group>``,
   ``train/update_skipped`` and ``train/nonfinite_steps`` (whole updates skipped), and for
   each expert of a trained network ``train/nonfinite_steps_<network>.<expert>`` (its
   updates skipped, alone or with the whole step's; e.g. ``train/nonfinite_steps_student.high_noise``).

It also holds the checkpoint hooks of every stage (frozen submodules left out of checkpoints
and put back on load, :func:`~distill_pl.models.finite_weights.check_finite`, the non-finite
counters) and the export at the end of fit (:meth:`~StageModule.export`).

Gradient accumulation and clipping are the module's settings (``accumulate_micro_batches``
and the stage's ``*grad_clip``), never the Trainer's: a Trainer with
``accumulate_grad_batches`` or ``gradient_clip_val`` is refused with a one-line error naming
the setting to use.
"""

from __future__ import annotations

import contextlib

import lightning as L
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.strategies import ParallelStrategy
from torch import Tensor
from torch.distributed.tensor.experimental import implicit_replication
from torch.nn.utils import clip_grads_with_norm_

from distill_pl.models.denoiser import Denoiser
from distill_pl.models.finite_weights import check_finite
from distill_pl.models.sharding import gradient_sync, is_sharded
from distill_pl.training.nonfinite import gradient_norm, strategy_of


class StageModule(L.LightningModule):
    """Base of the training stages: the one training loop, checkpoint hooks and export.

    Subclasses build their networks, set ``self.nonfinite`` (a
    :class:`~distill_pl.training.nonfinite.NonFinitePolicy`), have the hyperparameters
    ``accumulate_micro_batches`` (>= 1) and ``export_dir``, and implement
    :meth:`phase_optimizer`, :meth:`phase_loss` and :meth:`export`
    (and :meth:`phase`, :meth:`phase_draws`, :meth:`after_update` where they need them).
    """

    #: the stage's name in messages ("KD", "DMD2", "teacher training")
    stage_name: str = "training"
    #: submodules rebuilt from their folders and never stored in checkpoints (also left out of
    #: distributed ones, see distill_pl.training.strategies)
    frozen_prefixes: tuple[str, ...] = ()
    #: what a checkpoint is called in the non-finite weights error (None: ``stage_name``)
    checkpoint_name: str | None = None
    #: checkpoint key of the non-finite counters
    nonfinite_key: str = "nonfinite"
    #: the stage's model-side name of its clip setting, in the Trainer-setting error
    grad_clip_setting: str = "grad_clip"
    #: phases per cycle (1: every step is the same phase)
    num_phases: int = 1
    #: logged keys (of :meth:`phase_loss`'s logs) shown in the progress bar
    progress_bar_logs: tuple[str, ...] = ("loss",)
    #: reduce the phase metrics across ranks when logging (``self.log(sync_dist=...)``)
    log_sync_dist: bool = False
    #: the networks (attribute names) that the ``compile`` setting compiles
    compiled_networks: tuple[str, ...] = ()

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        #: the last training step's metrics, as floats
        self.step_metrics: dict[str, float] = {}

    # --- what a stage provides ------------------------------------------------------------
    def phase(self, step: int | None = None) -> int:
        """The phase of training step ``step`` (default: the current global step)."""
        return 0

    def phase_name(self, phase: int) -> str | None:
        """Which update a phase is, for the non-finite warning (None: not named)."""
        return None

    def phase_optimizer(self, phase: int) -> tuple[int, dict[str, torch.nn.Module], float | None]:
        """(index of the phase's optimizer in ``configure_optimizers``, its networks by group
        name, the max total gradient norm or None)."""
        raise NotImplementedError

    def phase_draws(self, phase: int, batch: dict, step: int):
        """The phase's random draws of the whole batch at ``step`` (an object with
        ``rows(slice)``), or None when the stage draws nothing."""
        return None

    def phase_loss(self, phase: int, batch: dict, draws) -> tuple[Tensor, dict[str, Tensor]]:
        """The phase's loss (a mean over the samples) and its logs on one micro-batch, given
        its rows of the draws."""
        raise NotImplementedError

    def after_update(self, phase: int, skipped_experts: dict[str, tuple[str, ...]]) -> None:
        """Called after an applied (not skipped) update of ``phase``: e.g. the EMA update.
        ``skipped_experts``: network -> its experts whose own update was skipped (a
        non-finite gradient confined to them), which the EMA leaves as they are."""

    def export(self, export_dir: str) -> None:
        """Write the trained model to ``export_dir`` (at the end of fit)."""

    def check_checkpoint(self, checkpoint: dict) -> None:
        """Refuse a checkpoint this stage cannot resume (before its state dict is loaded)."""

    # --- the Trainer's settings -------------------------------------------------------------
    @property
    def trainer(self) -> "L.Trainer":
        return L.LightningModule.trainer.fget(self)

    @trainer.setter
    def trainer(self, trainer: "L.Trainer | None") -> None:
        if trainer is not None and trainer.state.fn == "fit":
            self.check_trainer_settings(trainer)
        L.LightningModule.trainer.fset(self, trainer)

    def check_trainer_settings(self, trainer: "L.Trainer") -> None:
        """One-line errors for the Trainer's accumulation and clipping, which this module does
        itself (checked when the Trainer attaches the module for fit, before Lightning's own,
        longer, refusal under manual optimization)."""
        if trainer.accumulate_grad_batches != 1:
            raise ValueError(
                f"trainer.accumulate_grad_batches={trainer.accumulate_grad_batches}: {type(self).__name__} "
                "accumulates gradients itself; set model.accumulate_micro_batches (each loaded batch of "
                "data.batch_size is split into that many micro-batches) and leave trainer.accumulate_grad_batches out"
            )
        if trainer.gradient_clip_val is not None and trainer.gradient_clip_val > 0:
            raise ValueError(
                f"trainer.gradient_clip_val={trainer.gradient_clip_val}: {type(self).__name__} clips gradients "
                f"itself; set model.{self.grad_clip_setting} and leave trainer.gradient_clip_val out"
            )

    def on_fit_start(self) -> None:
        """``compile: true``: regional compilation of :attr:`compiled_networks`
        (:meth:`~distill_pl.models.denoiser.Denoiser.compile_blocks`), after the strategy has
        sharded them (``configure_model``); each block compiles at its first call."""
        if self.hparams.get("compile"):
            for name in self.compiled_networks:
                getattr(self, name).compile_blocks()

    def setup(self, stage: str) -> None:
        precision = str(self.trainer.precision)
        if precision.startswith("16"):
            raise ValueError(
                f"{self.stage_name} does not support precision={precision!r} (fp16 needs a gradient scaler, "
                "which cannot skip non-finite steps the way this module does); use 32-true or bf16-mixed"
            )

    # --- the training loop ----------------------------------------------------------------
    def transfer_batch_to_device(self, batch, device: torch.device, dataloader_idx: int):
        """A training batch stays in host memory: :meth:`training_step` moves each micro-batch
        (and its rows of the draws) to the device when it runs it. Validation and prediction
        batches move whole, as Lightning moves them."""
        if self._trainer is not None and self.trainer.training:
            return batch
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        """One optimizer step of the phase of this step (see the module docstring); returns the
        batch's loss (detached: the micro-batch losses weighted by their share), which
        Lightning hands to ``on_train_batch_end`` as ``outputs["loss"]``."""
        step = self.global_step
        phase = self.phase(step)
        index, groups, max_norm = self.phase_optimizer(phase)
        optimizers = self.optimizers()
        optimizer = optimizers[index] if isinstance(optimizers, (list, tuple)) else optimizers
        draws = self.phase_draws(phase, batch, step)
        size = len(batch["text_embeds"])
        n = min(self.hparams.accumulate_micro_batches, size)
        bounds = [size * i // n for i in range(n + 1)]
        logs: dict[str, Tensor] = {}
        total = torch.zeros(())
        finite = True
        with self.toggled_optimizer(optimizer):
            optimizer.zero_grad(set_to_none=True)
            for lo, hi in zip(bounds, bounds[1:]):
                rows = slice(lo, hi)
                with self._gradient_sync(last=hi == size):
                    micro = move_data_to_device(micro_batch(batch, rows), self.device)
                    micro_draws = None if draws is None else move_data_to_device(draws.rows(rows), self.device)
                    loss, micro_logs = self.phase_loss(phase, micro, micro_draws)
                    weight = (hi - lo) / size
                    total = weight * loss.detach() if lo == 0 else total + weight * loss.detach()
                    for k, v in micro_logs.items():
                        logs[k] = logs.get(k, 0.0) + weight * v.detach()
                    # decided jointly by all ranks, before backward
                    finite = self.trainer.strategy.reduce_boolean_decision(bool(torch.isfinite(loss)), all=True)
                    if not finite:
                        break
                    self.manual_backward(weight * loss)
            applied, norms, skipped = self._update(optimizer, finite, groups, max_norm)
        self._step_lr_scheduler(optimizer, step)
        if applied:
            self.after_update(phase, skipped)
        experts = {f"{network}.{expert}": applied and expert not in skipped.get(network, ())
                   for network, module in groups.items() for expert in experts_of(module)}
        self.nonfinite.record(applied, step, self.phase_name(phase), experts)
        self._log_step(step, logs, norms, applied, size)
        return total

    def _gradient_sync(self, last: bool):
        """Context of a micro-batch: DDP all-reduces (FSDP2 reduce-scatters) gradients only
        in the last one's backward."""
        sharded = self.sharded_networks()
        if sharded:
            return gradient_sync(sharded, enabled=last)
        if last or not isinstance(self.trainer.strategy, ParallelStrategy):
            return contextlib.nullcontext()
        return self.trainer.strategy.block_backward_sync()

    def sharded_networks(self) -> tuple[torch.nn.Module, ...]:
        """The trained networks whose gradient sync is switched off for all but the last
        micro-batch under FSDP2 (empty: none is sharded; default: every sharded submodule
        with a trainable parameter)."""
        return tuple(m for m in self.children()
                     if is_sharded(m) and any(p.requires_grad for p in m.parameters()))

    def _update(
        self, optimizer, finite: bool, groups: dict[str, torch.nn.Module], max_norm: float | None
    ) -> tuple[bool, dict[str, Tensor], dict[str, tuple[str, ...]]]:
        """Gradient norms (+ clipping) of the accumulated gradients, one optimizer step.
        Returns (applied, norms, the experts skipped alone: network -> expert names).

        A non-finite loss (``finite`` False) or gradient skips the update: every gradient is
        set to None before ``optimizer.step()``, which then changes nothing but still counts
        as Lightning's step. A non-finite gradient confined to some experts of the phase's
        networks sets only their gradients to None (:func:`_drop_nonfinite_experts`); the
        norms and the clipping are then those of the rest.
        """
        norms: dict[str, Tensor] = {}
        skipped: dict[str, tuple[str, ...]] = {}
        if finite:
            norms, total = _gradient_norms(groups)
            if not torch.isfinite(total) and (skipped := _drop_nonfinite_experts(groups)):
                norms, total = _gradient_norms(groups)  # of the gradients left
            finite = bool(torch.isfinite(total))  # gradients are all-reduced: same on every rank
            if finite and max_norm is not None:
                params = [p for module in groups.values() for p in module.parameters() if p.grad is not None]
                with implicit_replication():  # a plain total norm may scale DTensor gradients
                    clip_grads_with_norm_(params, max_norm, total)
        if not finite:
            norms, skipped = {}, {}
            optimizer.zero_grad(set_to_none=True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)  # frees the gradients until this optimizer's next step
        return finite, norms, skipped

    def _step_lr_scheduler(self, optimizer, step: int) -> None:
        """Step the learning-rate schedulers of ``optimizer``, if it has any: after every
        optimizer step (skipped ones included), as Lightning's ``interval: "step"`` does
        under automatic optimization (every ``frequency`` steps)."""
        raw = getattr(optimizer, "optimizer", optimizer)  # LightningOptimizer -> torch optimizer
        for config in self.trainer.lr_scheduler_configs:
            if config.scheduler.optimizer is not raw:
                continue
            if config.interval != "step" or config.reduce_on_plateau:
                raise ValueError(f"{self.stage_name} steps learning-rate schedulers per step only "
                                 f"(interval 'step', not reduce-on-plateau), got interval {config.interval!r}")
            if (step + 1) % config.frequency == 0:
                config.scheduler.step()

    def _log_step(self, step: int, logs: dict, norms: dict, applied: bool, batch_size: int) -> None:
        """Log this step's metrics; ``self.step_metrics`` keeps them as floats.

        ``train/update_skipped`` and ``train/nonfinite_steps`` exist in every step and go
        through ``self.log`` (with ``train/phase`` when the stage has several phases). A
        single-phase stage logs its own metrics (losses, gradient norms) through ``self.log``
        too. With several phases they go to the loggers directly, at Lightning's logging
        steps: through ``self.log`` Lightning would re-log a key's last value at every later
        step of the epoch, so a critic loss would appear again at student steps. They still
        reach ``callback_metrics`` and the progress bar (``logger=False``).
        """
        phase_metrics = {f"train/{k}": v.detach().float() for k, v in logs.items()}
        phase_metrics.update({f"train/grad_norm_{k}": v for k, v in norms.items()})
        common = {
            "train/update_skipped": float(not applied),
            "train/nonfinite_steps": float(self.nonfinite.total),
            **{f"train/nonfinite_steps_{name}": float(count) for name, count in self.nonfinite.expert_total.items()},
        }
        if self.num_phases > 1:
            common = {"train/phase": float(self.phase(step)), **common}
        self.step_metrics = {k: float(v) for k, v in {**phase_metrics, **common}.items()}
        self.log_dict(common, on_step=True, on_epoch=False, batch_size=batch_size)
        shown = {f"train/{k}" for k in self.progress_bar_logs}
        several = self.num_phases > 1
        for key, value in phase_metrics.items():
            self.log(key, value, on_step=True, on_epoch=False, logger=not several, prog_bar=key in shown,
                     batch_size=batch_size, sync_dist=self.log_sync_dist)
        if several and self.loggers and (step + 1) % self.trainer.log_every_n_steps == 0:
            values = {k: self.step_metrics[k] for k in phase_metrics}
            for logger in self.loggers:
                logger.log_metrics(values, step=step)

    @property
    def nonfinite_total(self) -> int:
        """Skipped (non-finite) updates of the run so far."""
        return self.nonfinite.total

    @property
    def nonfinite_streak(self) -> int:
        """Skipped updates in a row up to the last step."""
        return self.nonfinite.streak

    # --- checkpoints ----------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Drop the frozen submodules (reloaded from their folders); keep the non-finite
        counters. Non-finite weights are refused
        (:func:`~distill_pl.models.finite_weights.check_finite`)."""
        state = checkpoint["state_dict"]
        if self.frozen_prefixes:
            for key in [k for k in state if k.startswith(self.frozen_prefixes)]:
                del state[key]
        check_finite(state, f"a {self.checkpoint_name or self.stage_name} checkpoint at step {self.global_step}", strategy_of(self))
        checkpoint[self.nonfinite_key] = self.nonfinite.state_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Refuse a checkpoint of another stage (:meth:`check_checkpoint`); put the current
        frozen submodules' weights in, so strict loading still reports any other missing or
        unexpected key; restore the non-finite counters."""
        self.check_checkpoint(checkpoint)
        if self.frozen_prefixes:
            state = checkpoint["state_dict"]
            for prefix in self.frozen_prefixes:
                for key, value in getattr(self, prefix[:-1]).state_dict().items():
                    state[prefix + key] = value
        self.nonfinite.load_state_dict(checkpoint.get(self.nonfinite_key, {}))

    # --- export ---------------------------------------------------------------------------
    def on_train_end(self) -> None:
        if self.hparams.get("export_dir"):
            self.export(self.hparams.export_dir)


def experts_of(network: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The experts of a trained network by name (:attr:`~distill_pl.models.denoiser.Denoiser.named_experts`;
    none for a network of one, or one that is not a denoiser)."""
    return network.named_experts if isinstance(network, Denoiser) else {}


def _gradient_norms(groups: dict[str, torch.nn.Module]) -> tuple[dict[str, Tensor], Tensor]:
    """The total L2 norm of each group's gradients and of all of them (of the full gradients
    when sharded: the same values on every rank)."""
    norms = {name: gradient_norm([p.grad for p in module.parameters() if p.grad is not None])
             for name, module in groups.items()}
    return norms, torch.stack(list(norms.values())).square().sum().sqrt()


def _drop_nonfinite_experts(groups: dict[str, torch.nn.Module]) -> dict[str, tuple[str, ...]]:
    """Set to None the gradients of every expert (of the networks in ``groups``) whose
    gradient norm is non-finite; returns network -> the experts dropped (none: empty)."""
    dropped: dict[str, tuple[str, ...]] = {}
    for network, module in groups.items():
        for name, expert in experts_of(module).items():
            params = [p for p in expert.parameters() if p.grad is not None]
            if params and not bool(torch.isfinite(gradient_norm([p.grad for p in params]))):
                for p in params:
                    p.grad = None
                dropped[network] = (*dropped.get(network, ()), name)
    return dropped


def micro_batch(batch: dict, rows: slice) -> dict:
    """The rows ``rows`` of every per-sample entry (tensor or list) of a batch."""
    return {k: v[rows] if isinstance(v, (Tensor, list, tuple)) else v for k, v in batch.items()}

