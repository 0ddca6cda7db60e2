"""A student's steps as data: the noise levels it is called at, and the subintervals between them.

A K-step student is called at noise levels ``s_0 = 1 > s_1 > ... > s_{K-1} > 0`` (rectified
flow, ``x_s = (1 - s) x0 + s eps``) and re-noises between them (see
:func:`distill_pl.diffusion.sampling.few_step_sample`). Configs give ``student_sigmas``
either before the teacher's timestep shift (the shift is applied, as a diffusers flow
scheduler does to custom sigmas) or already shifted.
"""

from __future__ import annotations

from typing import Sequence

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


def subinterval_bounds(levels: Sequence[float]) -> list[tuple[float, float]]:
    """The K subintervals ``(s_{k+1}, s_k]`` of the noise range, one per student step
    (``s_K = 0``): step k maps its input at ``s_k`` to a state at ``s_{k+1}``."""
    lower = list(levels[1:]) + [0.0]
    return list(zip(lower, levels))


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
