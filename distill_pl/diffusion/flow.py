"""Rectified-flow conversions (the convention of Wan, Cosmos 2.5 and LTX in diffusers).

``sigma`` in [0, 1] is the noise level: ``x_sigma = (1 - sigma) * x0 + sigma * eps``.
Networks predict the velocity ``v = eps - x0`` (``d x_sigma / d sigma``).
All functions broadcast ``sigma`` of shape [B] over the trailing dims of ``x``.
"""

from __future__ import annotations

import torch
from torch import Tensor


def expand_like(sigma: Tensor | float, x: Tensor) -> Tensor:
    """View ``sigma`` ([B] or scalar) as [B, 1, 1, ...] to broadcast against ``x``."""
    sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    if sigma.ndim == 0:
        return sigma
    return sigma.reshape(sigma.shape[0], *([1] * (x.ndim - 1)))


def add_noise(x0: Tensor, eps: Tensor, sigma: Tensor | float) -> Tensor:
    """``x_sigma = (1 - sigma) * x0 + sigma * eps``."""
    s = expand_like(sigma, x0)
    return (1 - s) * x0 + s * eps


def velocity(x0: Tensor, eps: Tensor) -> Tensor:
    """The flow-matching target ``v = eps - x0``."""
    return eps - x0


def x0_from_velocity(x_t: Tensor, sigma: Tensor | float, v: Tensor) -> Tensor:
    """``x0 = x_sigma - sigma * v``."""
    return x_t - expand_like(sigma, x_t) * v


def eps_from_velocity(x_t: Tensor, sigma: Tensor | float, v: Tensor) -> Tensor:
    """``eps = x_sigma + (1 - sigma) * v``."""
    return x_t + (1 - expand_like(sigma, x_t)) * v


def velocity_from_x0(x_t: Tensor, sigma: Tensor | float, x0: Tensor) -> Tensor:
    """Velocity that maps ``x_t`` at ``sigma`` to the clean estimate ``x0`` (sigma > 0)."""
    return (x_t - x0) / expand_like(sigma, x_t)


def score_from_velocity(x_t: Tensor, sigma: Tensor | float, v: Tensor) -> Tensor:
    """Score ``grad log p_sigma(x_t) = -eps_hat / sigma`` of the noised distribution.

    ``x_sigma`` given ``x0`` is Gaussian with mean ``(1 - sigma) x0`` and std ``sigma``, so
    Tweedie's formula gives the score ``-E[eps | x_sigma] / sigma``.
    """
    return -eps_from_velocity(x_t, sigma, v) / expand_like(sigma, x_t)


def shift_sigma(sigma: Tensor | float, shift: float) -> Tensor | float:
    """Resolution shift ``s(sigma) = shift * sigma / (1 + (shift - 1) * sigma)``.

    ``shift = 1`` is the identity; ``shift > 1`` moves mass to high noise (Wan uses 3 at
    480p, 5 at 720p). Maps [0, 1] onto [0, 1] monotonically.
    """
    return shift * sigma / (1 + (shift - 1) * sigma)


def classifier_free_guidance(v_uncond: Tensor, v_cond: Tensor, guidance: float | Tensor) -> Tensor:
    """CFG in the common form ``u + w (c - u)``; ``w = 1`` is the conditional prediction
    (``guidance`` a number, or a tensor that broadcasts: one weight per sample).

    Cosmos writes ``c + g (c - u)``: the same thing with ``w = g + 1``.
    """
    return v_uncond + guidance * (v_cond - v_uncond)


def cosmos_guidance_to_w(g: float) -> float:
    """Convert a Cosmos-form guidance ``g`` (``c + g(c - u)``) to our ``w = g + 1``."""
    return g + 1.0
