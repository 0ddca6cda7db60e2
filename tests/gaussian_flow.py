"""Closed forms of rectified flow for Gaussian data x0 ~ N(mu, s^2) (elementwise).

x_sigma = (1 - sigma) x0 + sigma eps is Gaussian with mean (1 - sigma) mu and variance
var = (1 - sigma)^2 s^2 + sigma^2; u = eps - x0 has Cov(u, x_sigma) = sigma - (1 - sigma) s^2.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _expand(sigma, x):
    sigma = torch.as_tensor(sigma, dtype=x.dtype)
    return sigma.reshape(-1, *([1] * (x.ndim - 1))) if sigma.ndim else sigma


def marginal_var(sigma, s: float):
    return (1 - sigma) ** 2 * s**2 + sigma**2


def exact_velocity(x_t: Tensor, sigma, mu: float, s: float) -> Tensor:
    """E[eps - x0 | x_sigma] for Gaussian data."""
    sg = _expand(sigma, x_t)
    var = marginal_var(sg, s)
    return -mu + (sg - (1 - sg) * s**2) / var * (x_t - (1 - sg) * mu)


def exact_score(x_t: Tensor, sigma, mu: float, s: float) -> Tensor:
    """grad_x log N(x; (1 - sigma) mu, var)."""
    sg = _expand(sigma, x_t)
    return -(x_t - (1 - sg) * mu) / marginal_var(sg, s)


def irreducible_fm_loss(sigma: float, s: float) -> float:
    """E[Var(eps - x0 | x_sigma)]: the flow-matching loss of the exact velocity."""
    var = marginal_var(sigma, s)
    return 1 + s**2 - (sigma - (1 - sigma) * s**2) ** 2 / var
