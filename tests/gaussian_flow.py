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


def mixture_x0(x_t: Tensor, sigma: Tensor, means: Tensor, s: float) -> Tensor:
    """E[x0 | x_sigma] for data an equal-weight mixture of N(means[i], s^2 I).

    x_t [B, D], sigma [B], means [M, D]. Given component i, x_sigma ~ N((1 - sigma) mu_i,
    var I) with var = (1 - sigma)^2 s^2 + sigma^2, and E[x0 | x_sigma, i] = mu_i + (1 - sigma)
    s^2 / var (x_sigma - (1 - sigma) mu_i); the components are weighted by their posterior.
    """
    sg = sigma.reshape(-1, 1, 1)
    var = marginal_var(sg, s)
    centred = x_t[:, None, :] - (1 - sg) * means[None]  # [B, M, D]
    weights = torch.softmax(-centred.square().sum(-1) / (2 * var[..., 0]), dim=1)  # [B, M]
    x0_given = means[None] + (1 - sg) * s**2 / var * centred
    return (weights[..., None] * x0_given).sum(1)


def energy_distance(x: Tensor, y: Tensor) -> float:
    """``2 E|X - Y| - E|X - X'| - E|Y - Y'|`` of two samples [N, D] (V-statistic)."""
    return float(2 * torch.cdist(x, y).mean() - torch.cdist(x, x).mean() - torch.cdist(y, y).mean())
