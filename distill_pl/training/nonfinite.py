"""The non-finite policy of every training stage (teacher training, KD, DMD2).

A step whose loss or accumulated gradient is non-finite (NaN or inf) is skipped and counted:
every gradient is set to None before ``optimizer.step()``, which then changes nothing (torch
optimizers skip parameters without a gradient, so no weight, moment, per-parameter step count
or weight decay moves; stepping with zeroed gradients would not do, AdamW's decoupled weight
decay and its moments would still move the weights) but still counts as Lightning's step, so
``global_step``, the data position and the step-keyed randomness stay in lockstep.
``max_consecutive`` skips in a row stop the run with :class:`NonFiniteTrainingError`, before
any NaN reaches the weights. The decision is the same on every rank: loss checks are reduced
across ranks, and the gradients checked are the all-reduced (or sharded, then gathered) ones.

Experts (a network of several, e.g. Wan 2.2 A14B's high- and low-noise experts,
:attr:`~distill_pl.models.denoiser.Denoiser.named_experts`): each expert's gradient is its
own, so a non-finite gradient confined to one expert's parameters skips that expert's update
only (its gradients set to None: no optimizer step, no EMA update for it) while the rest of
the step's update is applied. Each expert, named ``<network>.<expert>`` (e.g.
``student.high_noise``), has its own counters: its skipped updates (alone or with the whole
step's) and how many of its phase's updates in a row were skipped; ``max_consecutive`` in a
row stop the run too. A non-finite loss is one scalar over a batch whose samples both experts
may have run, so it still skips the whole update.

The loop that applies it is :class:`~distill_pl.training.base.StageModule`'s
``training_step``; this class keeps the counters.

Checkpoints and exports refuse non-finite weights
(:func:`~distill_pl.models.finite_weights.check_finite`), whatever produced them, so no NaN
tensor is ever written as a result.
"""

from __future__ import annotations

from typing import Iterable, Mapping

from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torch.nn.utils import get_total_norm

from distill_pl.models.sharding import full_tensor


class NonFiniteTrainingError(RuntimeError):
    """Raised after ``max_consecutive`` consecutive steps with a non-finite loss or gradient."""


class NonFinitePolicy:
    """Counts skipped (non-finite) updates of one stage and stops a run that keeps failing.

    Args:
        stage: the stage's name in messages (``"KD"``, ``"DMD2"``, ``"teacher training"``).
        max_consecutive: stop after this many consecutive skipped updates.
    """

    def __init__(self, stage: str, max_consecutive: int) -> None:
        if max_consecutive < 1:
            raise ValueError(f"max_nonfinite_steps must be >= 1, got {max_consecutive}")
        self.stage = stage
        self.max_consecutive = max_consecutive
        self.total = 0
        self.streak = 0
        #: per expert (``"<network>.<expert>"``): its skipped updates in all and in a row
        self.expert_total: dict[str, int] = {}
        self.expert_streak: dict[str, int] = {}

    def record(self, applied: bool, step: int, what: str | None = None,
               experts: Mapping[str, bool] | None = None) -> None:
        """Count an update that was applied or skipped at ``step`` (``what``: which update, in
        the warning); ``experts``: each expert of the step's networks -> whether its own update
        was applied (False: skipped, alone or with the whole update). Raise
        :class:`NonFiniteTrainingError` at ``max_consecutive`` skips in a row, of the whole
        update or of one expert's."""
        experts = experts or {}
        for name, expert_applied in experts.items():
            self.expert_streak[name] = 0 if expert_applied else self.expert_streak.get(name, 0) + 1
            self.expert_total[name] = self.expert_total.get(name, 0) + (not expert_applied)
        skipped = [name for name, expert_applied in experts.items() if not expert_applied]
        if applied:
            self.streak = 0
        else:
            self.total += 1
            self.streak += 1
        if self.streak >= self.max_consecutive:
            raise NonFiniteTrainingError(
                f"{self.stage} stopped at step {step}: {self.streak} consecutive steps had a "
                f"non-finite loss or gradient (max_nonfinite_steps={self.max_consecutive}; {self.total} "
                "in total). Their updates were skipped, so the weights hold no NaN; check the data "
                "and the teacher, lower the learning rates, or use precision 32-true."
            )
        for name in skipped:
            if self.expert_streak[name] >= self.max_consecutive:
                raise NonFiniteTrainingError(
                    f"{self.stage} stopped at step {step}: {self.expert_streak[name]} consecutive updates of "
                    f"{name} were skipped for a non-finite loss or gradient (max_nonfinite_steps="
                    f"{self.max_consecutive}; {self.expert_total[name]} in total), so its weights hold no NaN; "
                    "check the data and the teacher, lower the learning rates, or use precision 32-true."
                )
        where = f" ({what})" if what else ""
        if not applied:
            rank_zero_warn(
                f"{self.stage} step {step}{where}: non-finite loss or gradient, update skipped "
                f"({self.streak} in a row, {self.total} in total)"
            )
        elif skipped:
            counts = "; ".join(f"{name}: {self.expert_streak[name]} in a row, {self.expert_total[name]} in total"
                               for name in skipped)
            rank_zero_warn(f"{self.stage} step {step}{where}: non-finite gradient in {', '.join(skipped)} only, "
                           f"its update skipped, the rest applied ({counts})")

    def state_dict(self) -> dict:
        state = {"nonfinite_total": self.total, "nonfinite_streak": self.streak}
        if self.expert_total:
            state["nonfinite_experts"] = {name: {"total": total, "streak": self.expert_streak[name]}
                                          for name, total in self.expert_total.items()}
        return state

    def load_state_dict(self, state: Mapping) -> None:
        self.total = int(state.get("nonfinite_total", 0))
        self.streak = int(state.get("nonfinite_streak", 0))
        experts = state.get("nonfinite_experts", {})
        self.expert_total = {name: int(counts["total"]) for name, counts in experts.items()}
        self.expert_streak = {name: int(counts["streak"]) for name, counts in experts.items()}


def gradient_norm(grads: Iterable[Tensor]) -> Tensor:
    """The total L2 norm of ``grads``, of the full gradients when they are sharded (DTensor):
    the same value on every rank (a collective then)."""
    return full_tensor(get_total_norm(list(grads))).float()


def strategy_of(module):
    """The strategy of a LightningModule's trainer (None outside a Trainer), for
    :func:`~distill_pl.models.finite_weights.check_finite` in checkpoint hooks."""
    trainer = getattr(module, "_trainer", None)
    return trainer.strategy if trainer is not None else None
