"""Training losses as pure functions of tensors and callables."""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from distill_pl.diffusion.flow import add_noise, shift_sigma, velocity

VelocityFn = Callable[[Tensor, Tensor], Tensor]
"""``v_hat = fn(x_t, sigma)``: a velocity predictor with the conditioning bound in."""


def flow_matching_loss(
    velocity_fn: VelocityFn, x0: Tensor, eps: Tensor, sigma: Tensor
) -> Tensor:
    """``mean((v_hat(x_sigma, sigma) - (eps - x0))^2)`` for one draw of ``eps`` and ``sigma``.

    x0, eps: [B, ...]; sigma: [B]. Returns a scalar.
    """
    x_t = add_noise(x0, eps, sigma)
    return torch.mean((velocity_fn(x_t, sigma) - velocity(x0, eps)) ** 2)


def sample_training_sigma(
    batch_size: int,
    shift: float = 1.0,
    t_min: float = 0.0,
    t_max: float = 1.0,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """``t ~ U[t_min, t_max]`` then the timestep shift: returns sigma [B]."""
    t = torch.rand(batch_size, generator=generator, device=device)
    return shift_sigma(t_min + (t_max - t_min) * t, shift)
