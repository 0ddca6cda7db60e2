"""A diffusers scheduler that runs a K-step student's sampler when a pipeline only passes K.

Some pipelines (``Cosmos2_5_TransferPipeline``) call ``scheduler.set_timesteps(num_inference_steps)``
and take no custom sigmas, so the scheduler's own rule must give the student's noise levels
``s_0 = 1 > s_1 > ... > s_{K-1}``. ``FlowMatchEulerDiscreteScheduler(stochastic_sampling=True)``
steps as the student samples (:func:`~distill_pl.diffusion.sampling.few_step_sample`: predict
``x0 = x - s_k v``, re-noise to ``s_{k+1}`` with fresh noise). Its ``set_timesteps(K)`` spaces
``u_i = 1 - a i`` evenly from 1 to its ``sigma_min``, applies its ``shift`` and stretches the
result so the last level is ``shift_terminal``; that gives exactly the ladders with

    1 - s_i = c * i / (1 - beta * i),   i = 0 .. K-1

(two parameters: ``c`` set by ``shift_terminal = s_{K-1}``, ``beta`` by ``shift``). They include
every evenly spaced ladder (``beta = 0``, shift 1, e.g. ``[1.0, 0.75, 0.5, 0.25]``), every
evenly spaced ladder after a timestep shift (the project's ``student_sigmas`` through the
teacher's shift), and every two-step ladder. Other ladders are refused.
"""

from __future__ import annotations

import math
from typing import Sequence

#: largest |scheduler level - student level| accepted (float32 rounding of the scheduler's
#: arithmetic is ~1e-7)
LEVEL_TOLERANCE = 1e-6


def few_step_euler_scheduler(levels: Sequence[float], sampler: str = "renoise"):
    """``FlowMatchEulerDiscreteScheduler`` whose ``set_timesteps(len(levels))`` gives
    ``levels`` (decreasing, starting at 1.0) and whose step is the student's: plain Euler for
    one level (one step from sigma = 1 is ``eps - v(eps, 1)``), ``stochastic_sampling``
    (x0 prediction, then fresh noise) with ``shift``/``shift_terminal`` fitted to the levels
    for more (plain Euler steps between the levels for a ``sampler="euler"`` student). ValueError
    when no such scheduler reproduces the levels (see the module doc).

    The stochastic step draws its noise with ``randn_tensor(generator=...)``; a pipeline that
    does not pass its generator to ``scheduler.step`` (Cosmos-Transfer2.5's) draws from
    torch's global RNG."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    levels = [float(s) for s in levels]
    if not levels or levels[0] != 1.0 or any(b >= a for a, b in zip(levels, levels[1:])) or levels[-1] <= 0:
        raise ValueError(f"student noise levels must start at 1.0 and decrease above 0, got {levels}")
    k = len(levels)
    if k == 1:
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    shift = _fitted_shift(levels, FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000).sigma_min)
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=shift, shift_terminal=levels[-1],
        stochastic_sampling=sampler == "renoise",
    )
    scheduler.set_timesteps(k)
    got = [float(s) for s in scheduler.sigmas[:k]]
    if max(abs(a - b) for a, b in zip(got, levels)) > LEVEL_TOLERANCE:
        raise ValueError(
            f"no FlowMatchEulerDiscreteScheduler gives the noise levels {levels} from "
            f"set_timesteps({k}) (fitted to the second and last it gives {[round(s, 6) for s in got]}); "
            "the levels must "
            "satisfy 1 - s_i = c i / (1 - beta i), e.g. evenly spaced, or evenly spaced through "
            "a timestep shift"
        )
    return scheduler


def _fitted_shift(levels: list[float], sigma_min: float) -> float:
    """The scheduler ``shift`` that matches ``beta`` of the ladder, read from its second level.

    With ``d = sigma_min`` (the start of the unshifted spacing, ``u_{K-1} = shift(d)``) and
    ``r = (1 - s_1) / (1 - s_{K-1})``, ``beta (K-1) = (1 - r (K-1)) / (1 - r)``; the scheduler
    gives ``beta (K-1) = (shift - 1)(1 - d) / (shift (1 + (shift - 1) d))``, a quadratic in
    ``shift`` whose root continuous with shift = 1 at beta = 0 is taken (1.0 when it has none
    that is positive; the verification in :func:`few_step_euler_scheduler` then refuses)."""
    k = len(levels)
    if k == 2:
        return 1.0
    r = (1.0 - levels[1]) / (1.0 - levels[-1])
    g = (1.0 - r * (k - 1)) / (1.0 - r) / (1.0 - sigma_min)  # beta (K-1) / (1 - d)
    # g d s^2 + (g (1 - d) - 1) s + 1 = 0, root 2 / ((1 - g (1 - d)) + sqrt(...))
    b = 1.0 - g * (1.0 - sigma_min)
    disc = b * b - 4.0 * g * sigma_min
    if disc < 0 or b + math.sqrt(disc) <= 0:
        return 1.0
    return 2.0 / (b + math.sqrt(disc))
