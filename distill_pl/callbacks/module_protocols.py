"""What the callbacks need from the LightningModule they are attached to, declared.

Each callback checks its module against its protocol when the Trainer sets it up
(:func:`require`), so a callback on a module that cannot serve it (e.g. the frame grid on the
pair-generation module) stops with one line naming both, before any step runs.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from torch import Tensor


@runtime_checkable
class GridRows(Protocol):
    """:class:`~distill_pl.callbacks.frame_grid.FrameGridLogger`'s source: the grid's rows for
    a validation batch, ``{label: video [B, 3, T, H, W] in [-1, 1]}`` in display order, drawn
    with ``seed``."""

    def grid_rows(self, batch: dict, seed: int) -> dict[str, Tensor]: ...


@runtime_checkable
class StudentSamples(Protocol):
    """:class:`~distill_pl.callbacks.collapse.CollapseMonitor`'s source: the student's samples of
    ``batch`` (on the module's device), decoded pixels [B, 3, T, H, W], drawn with ``seed``."""

    def student_samples(self, batch: dict, seed: int) -> Tensor: ...


@runtime_checkable
class ShardBuilder(Protocol):
    """:class:`~distill_pl.callbacks.shard_writer.PairShardWriter`'s source: the metadata every
    shard of the run records, and one shard's tensors and metadata from its rows (the
    module's ``predict_step`` outputs) and the run's common metadata."""

    def pair_generation_metadata(self) -> dict: ...

    def build_shard(self, rows: list[dict], common: dict) -> tuple[dict[str, Tensor], dict]: ...


def require(module, protocol: type, callback) -> None:
    """TypeError (one line) unless ``module`` has every method of ``protocol``."""
    if not isinstance(module, protocol):
        needed = ", ".join(name for name in protocol.__dict__ if not name.startswith("_"))
        raise TypeError(f"{type(callback).__name__} needs a model with {needed} ({protocol.__name__}); "
                        f"{type(module).__name__} has not: remove the callback from this config's trainer.callbacks")
