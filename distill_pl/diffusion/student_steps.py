"""A student's steps as data: the noise levels it is called at, and the subintervals between them.

A K-step student is called at noise levels ``s_0 = 1 > s_1 > ... > s_{K-1} > 0`` (rectified
flow, ``x_s = (1 - s) x0 + s eps``) and re-noises between them (see
:func:`distill_pl.diffusion.sampling.few_step_sample`). Configs give ``student_sigmas``
either before the teacher's timestep shift (the shift is applied, as a diffusers flow
scheduler does to custom sigmas) or already shifted.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor

from distill_pl.diffusion.flow import expand_like, shift_sigma


def student_noise_levels(student_sigmas: Sequence[float], shift: float, shifted: bool) -> tuple[float, ...]:
    """The K noise levels of a student: ``student_sigmas`` through the timestep shift
    (``shifted=False``) or as given (``shifted=True``). Raises ValueError unless they
    start at 1.0 and decrease strictly, staying above 0."""
    given = [float(s) for s in student_sigmas]
    if not given or given[0] != 1.0 or any(b >= a for a, b in zip(given, given[1:])) or given[-1] <= 0.0:
        raise ValueError(f"student_sigmas must start at 1.0 and decrease strictly above 0, got {given}")
    return tuple(given) if shifted else tuple(float(shift_sigma(s, shift)) for s in given)


def unshift_sigma(sigma: float, shift: float) -> float:
    """Inverse of the timestep shift: the ``u`` with ``shift_sigma(u, shift) == sigma``."""
    return sigma / (shift - (shift - 1.0) * sigma)


def subinterval_bounds(levels: Sequence[float], boundaries: Sequence[float] | None = None) -> list[tuple[float, float]]:
    """The subintervals ``(lower, upper]`` of the noise range, one per phase of
    :func:`phase_steps`: with ``boundaries`` None the K subintervals ``(s_{k+1}, s_k]``
    (``s_K = 0``; step k maps its input at ``s_k`` to a state at ``s_{k+1}``); otherwise the
    intervals between consecutive boundaries, 1 and 0 at the ends."""
    upper = [levels[steps.start] for steps in phase_steps(levels, boundaries)]
    return list(zip(upper[1:] + [0.0], upper))


def phase_steps(levels: Sequence[float], boundaries: Sequence[float] | None = None) -> list[range]:
    """The student steps of each phase of Phased DMD, highest noise first. ``boundaries``: the
    noise levels where one phase ends and the next begins, each one of ``levels`` other than
    the first (:func:`phase_boundary_indices` checks them); None: every level is a boundary,
    one step per phase. A phase's steps map its upper end down to its lower end."""
    starts = [0, *phase_boundary_indices(boundaries, levels)] if boundaries is not None else list(range(len(levels)))
    return [range(a, b) for a, b in zip(starts, starts[1:] + [len(levels)])]


def phase_boundary_indices(boundaries: Sequence[float], levels: Sequence[float],
                           key: str = "phase_boundaries") -> list[int]:
    """The indices in ``levels`` of the phase ``boundaries``. Raises a one-line ValueError
    naming ``key`` for a boundary outside (0, 1), boundaries that do not decrease strictly
    (the order of ``levels``), or a boundary that is not one of ``levels``."""
    given = [float(b) for b in boundaries]
    outside = [b for b in given if not 0.0 < b < 1.0]
    if outside:
        raise ValueError(f"{key}: each boundary must lie strictly inside (0, 1), got {outside}")
    if any(b >= a for a, b in zip(given, given[1:])):
        raise ValueError(f"{key} must decrease strictly (as student_sigmas do), got {given}")
    missing = [b for b in given if b not in levels]
    if missing:
        raise ValueError(f"{key}: {missing} not among the student's levels {list(levels)}: "
                         "a phase boundary is one of student_sigmas")
    return [list(levels).index(b) for b in given]


#: the setting of ``phase_boundaries`` that splits the phases at a two-expert student's boundary
EXPERTS_BOUNDARY = "experts"


def resolve_phase_boundaries(
    setting: Sequence[float] | str | None, student_sigmas: Sequence[float], levels: Sequence[float],
    low_noise_levels: Callable[[Tensor], Tensor | None],
) -> tuple[float, ...] | None:
    """The Phased DMD phase boundaries as noise levels (members of ``levels``, the student's
    levels after the shift, decreasing) from the setting ``phase_boundaries``: None (every level
    a boundary, returned as None); values of ``student_sigmas`` (as the config writes them;
    :func:`phase_boundary_indices` checks them); or :data:`EXPERTS_BOUNDARY`: for a two-expert
    student, the first (largest) level its low-noise expert runs (``low_noise_levels``, its
    :meth:`~distill_pl.models.denoiser.Denoiser.low_noise_levels`), so that each phase holds
    exactly the steps one expert runs. One-line ValueError naming ``phase_boundaries`` for a
    one-network student or for levels that all run on one expert (naming the experts' boundary
    level, :func:`experts_boundary`)."""
    if setting is None:
        return None
    if isinstance(setting, str):
        if setting != EXPERTS_BOUNDARY:
            raise ValueError(f"phase_boundaries must be a list of student_sigmas or {EXPERTS_BOUNDARY!r}, "
                             f"got {setting!r}")
        routed = low_noise_levels(torch.tensor(list(levels), dtype=torch.float64))
        if routed is None:
            raise ValueError(f"phase_boundaries: {EXPERTS_BOUNDARY!r} needs a two-expert student; "
                             "this student is one network")
        low = routed.tolist()
        if all(low) or not any(low):
            raise ValueError(
                f"phase_boundaries: {EXPERTS_BOUNDARY!r}: the student levels {[round(x, 6) for x in levels]} (after "
                f"the shift) all run on the {'low' if all(low) else 'high'}-noise expert; its phases need levels "
                f"on both sides of the experts' boundary sigma {experts_boundary(low_noise_levels)}")
        return (levels[low.index(True)],)
    return tuple(levels[i] for i in phase_boundary_indices(setting, student_sigmas))


def experts_boundary(low_noise_levels: Callable[[Tensor], Tensor | None]) -> float | None:
    """The noise level where a two-expert model switches experts, from its routing alone
    (``low_noise_levels(sigma [B])`` -> bool [B], True where the low-noise expert runs, or
    None for one network): the smallest level its high-noise expert takes, found by bisection
    on float64 levels in (0, 1) and rounded to 6 significant digits (so a boundary compared
    on float32 timesteps, e.g. 875 / 1000, reads as 0.875). None for one network, or when
    the routing does not give the levels near 0 to the low-noise expert and 1 to the other."""

    def low(sigma: float) -> bool | None:
        routed = low_noise_levels(torch.tensor([sigma], dtype=torch.float64))
        return None if routed is None else bool(routed[0])

    if low(1.0) is not False or low(0.0) is not True:
        return None
    below, above = 0.0, 1.0
    for _ in range(64):
        middle = 0.5 * (below + above)
        below, above = (middle, above) if low(middle) else (below, middle)
    return float(f"{above:.6g}")


def diffuse_from(x_s: Tensor, s: Tensor, t: Tensor, noise: Tensor) -> Tensor:
    """Forward diffusion of a state at level ``s`` to a higher level ``t`` (both [B]):
    ``x_t = a x_s + b n`` with ``a = (1 - t) / (1 - s)`` and ``b^2 = t^2 - a^2 s^2``, so that
    ``x_s = (1 - s) x0 + s eps`` gives ``x_t = (1 - t) x0 + t eps'``. With ``s = 0`` this is
    :func:`distill_pl.diffusion.flow.add_noise`."""
    a, b = _transition(s, t, x_s)
    return a * x_s + b * noise


def subinterval_flow_target(x_t: Tensor, t: Tensor, x_s: Tensor, s: Tensor) -> tuple[Tensor, Tensor]:
    """Flow-matching target of a velocity network at ``(x_t, t)`` when only the state ``x_s``
    at a lower level ``s < t`` is known (score matching within a subinterval), and its weight.

    The conditional score of ``x_t`` given ``x_s`` is ``-(x_t - a x_s) / b^2`` and (Markov
    chain) its mean given ``x_t`` is the marginal score; a velocity ``v`` has the score
    ``-(x_t - (1 - t) x0_hat) / t^2`` with ``x0_hat = x_t - t v``. Equating them gives the
    clean target ``x0* = (x_t - t^2 (x_t - a x_s) / b^2) / (1 - t)`` and ``v* = (x_t - x0*) / t``;
    ``s = 0`` gives the usual ``v* = eps - x0``. The target's variance grows like ``t^2 / b^2``
    as ``t -> s``: the weight ``b^2 / t^2`` (per sample, [B]) keeps the weighted squared error
    bounded and does not move its minimiser (the conditional mean of ``v*``).
    Returns (v* shaped like ``x_t``, weight [B]).
    """
    a, b = _transition(s, t, x_t)
    t_ = expand_like(t, x_t)
    x0 = (x_t - t_.square() * (x_t - a * x_s) / b.square()) / (1 - t_)
    return (x_t - x0) / t_, (b.square() / t_.square()).flatten()


def _transition(s: Tensor, t: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
    s_, t_ = expand_like(s, like), expand_like(t, like)
    a = (1 - t_) / (1 - s_)
    return a, torch.sqrt((t_.square() - (a * s_).square()).clamp_min(0.0))
