"""Refuse to write non-finite weights: every checkpoint and export checks its tensors first."""

from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor


class NonFiniteWeightsError(RuntimeError):
    """Raised instead of writing a checkpoint or an export that holds non-finite weights."""


def check_finite(tensors: Mapping[str, Tensor], what: str, strategy=None) -> None:
    """Raise :class:`NonFiniteWeightsError` (one line, naming ``what`` and the first bad
    tensor) if a floating-point tensor of ``tensors`` holds NaN or inf. Sharded tensors are
    checked shard by shard; with a Lightning ``strategy`` every rank raises when any rank
    found one (a collective)."""
    bad = [name for name, t in tensors.items() if _has_nonfinite(t)]
    finite = not bad if strategy is None else strategy.reduce_boolean_decision(not bad, all=True)
    if not finite:
        example = f", e.g. {bad[0]!r}" if bad else " on another rank"
        raise NonFiniteWeightsError(f"refusing to write {what}: {len(bad) or 'some'} tensor(s) hold NaN or inf{example}")


def _has_nonfinite(t) -> bool:
    if not isinstance(t, Tensor) or not t.is_floating_point():
        return False
    local = t.to_local() if hasattr(t, "to_local") else t
    return not bool(torch.isfinite(local).all())
