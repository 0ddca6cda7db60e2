"""Samplers over a velocity function ``v = fn(x_t, sigma)``.

Multi-step teacher sampling delegates the update rule to a diffusers flow scheduler
(UniPC with flow sigmas, as Wan's pipeline configures it, or flow-match Euler); the
one-step and few-step student samplers are closed forms: one step from pure noise,
``x_g = eps - v(eps, 1)``; K steps predict ``x0 = x - sigma_k v`` and re-noise it to
``sigma_{k+1}`` (or take an Euler step) in between.
"""

from __future__ import annotations

from typing import Callable, Literal, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from distill_pl.diffusion.flow import add_noise, x0_from_velocity

VelocityFn = Callable[[Tensor, Tensor], Tensor]

SchedulerName = Literal["unipc", "euler"]

#: how a K-step student moves between its noise levels: ``"renoise"`` (predict x0, re-noise it
#: with fresh noise: :func:`few_step_sample`) or ``"euler"`` (deterministic Euler steps of the
#: probability-flow ODE: :func:`euler_step_sample`); the two are the same for one step
StudentSampler = Literal["renoise", "euler"]


def build_flow_scheduler(name: SchedulerName = "unipc", shift: float = 1.0):
    """A diffusers scheduler for flow-prediction models.

    ``unipc``: ``UniPCMultistepScheduler(prediction_type="flow_prediction",
    use_flow_sigmas=True, flow_shift=shift)`` -- the scheduler Wan2.1's diffusers pipeline
    ships. ``euler``: ``FlowMatchEulerDiscreteScheduler(shift=shift)``.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

    if name == "unipc":
        return UniPCMultistepScheduler(
            num_train_timesteps=1000,
            prediction_type="flow_prediction",
            use_flow_sigmas=True,
            flow_shift=shift,
            solver_order=2,
        )
    if name == "euler":
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    raise ValueError(f"unknown scheduler {name!r}; expected 'unipc' or 'euler'")


def build_student_scheduler(shift: float, num_levels: int, sampler: "StudentSampler" = "renoise"):
    """The diffusers scheduler of a student called at ``num_levels`` noise levels:
    ``FlowMatchEulerDiscreteScheduler(shift=shift)``, with ``stochastic_sampling`` for more
    than one level when the student's ``sampler`` is ``"renoise"`` (each step predicts x0 and
    re-noises it to the next level with fresh noise: :func:`few_step_sample`), plain Euler
    steps (:func:`euler_step_sample`) for ``"euler"``. Its ``set_timesteps(sigmas=...)`` with the levels before
    the shift gives the student's levels; one step from sigma = 1 is ``eps - v(eps, 1)``
    for every shift."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift,
                                           stochastic_sampling=num_levels > 1 and sampler == "renoise")


#: ``(timesteps[i], sigmas[i]) -> sigma``: the noise level (0-d tensor) at which a scheduler
#: step evaluates the velocity function
StepSigma = Callable[[Tensor, Tensor], Tensor]


@torch.no_grad()
def sample_with_scheduler(
    velocity_fn: VelocityFn,
    noise: Tensor,
    scheduler,
    num_steps: int,
    progress: bool = False,
    step_sigma: StepSigma | None = None,
    on_step: Callable[[int, float, Tensor], None] | None = None,
) -> Tensor:
    """Integrate from pure noise (sigma = 1) to a clean sample with ``scheduler``.

    Step ``i`` evaluates ``velocity_fn`` at ``step_sigma(scheduler.timesteps[i],
    scheduler.sigmas[i])`` (its dtype kept, the batch filled with it); by default (None) at
    the scheduler's exact ``sigmas[i]`` in the dtype of ``noise``. A denoiser's
    ``sampler_sigma`` is the ``step_sigma`` of its family's pipeline (Wan's passes the
    integer timestep). The update itself is ``scheduler.step(v, timesteps[i], x)``.
    ``on_step(i, sigma_i, x_i)``, if given, sees the state before step ``i`` is evaluated
    (``sigma_i = scheduler.sigmas[i]``).
    noise: [B, ...]. Returns x0 [B, ...].
    """
    scheduler.set_timesteps(num_steps, device=noise.device)
    x = noise
    batch = (noise.shape[0],)
    steps = list(zip(scheduler.timesteps, scheduler.sigmas))
    for i, (t, s) in enumerate(tqdm(steps, desc="sampling", disable=not progress, leave=False)):
        if on_step is not None:
            on_step(i, float(s), x)
        if step_sigma is None:
            sigma = torch.full(batch, float(s), device=noise.device, dtype=noise.dtype)
        else:
            sigma = step_sigma(t, s).to(noise.device).expand(batch)
        v = velocity_fn(x, sigma)
        x = scheduler.step(v, t, x, return_dict=False)[0]
    return x


def scheduler_step_sigmas(scheduler, num_steps: int) -> list[float]:
    """The sigmas at which :func:`sample_with_scheduler` evaluates the network (one per step)."""
    scheduler.set_timesteps(num_steps)
    return [float(s) for s in scheduler.sigmas[:num_steps]]


def trajectory_steps(step_sigmas: Sequence[float], levels: Sequence[float]) -> list[int]:
    """For each level, the first step ``i`` with ``step_sigmas[i] <= level`` (``step_sigmas``
    decreasing). ValueError when no step reaches a level."""
    steps = []
    for level in levels:
        i = next((i for i, s in enumerate(step_sigmas) if s <= level), None)
        if i is None:
            raise ValueError(f"no sampling step reaches sigma <= {level} (the last step is at "
                             f"sigma {step_sigmas[-1]:.4g}); use higher levels or more steps")
        steps.append(i)
    return steps


def one_step_sample(velocity_fn: VelocityFn, noise: Tensor) -> Tensor:
    """Student generation from pure noise: ``x_g = eps - v(eps, 1)``."""
    sigma = torch.ones(noise.shape[0], device=noise.device, dtype=noise.dtype)
    return x0_from_velocity(noise, sigma, velocity_fn(noise, sigma))


def few_step_sample(
    velocity_fn: VelocityFn,
    noise: Tensor,
    sigmas: Sequence[float],
    generator: torch.Generator | None = None,
    renoise: Sequence[Tensor] | None = None,
) -> Tensor:
    """Euler re-noising sampler of a K-step student: at each noise level ``s_k`` predict the
    clean sample ``x0 = x - s_k v(x, s_k)``, then re-noise it to the next level with fresh
    noise, ``x = (1 - s_{k+1}) x0 + s_{k+1} n_k``; the last prediction is the sample.

    noise: [B, ...] the pure noise at ``sigmas[0] = 1``. ``sigmas``: the K noise levels,
    decreasing, in (0, 1], starting at 1.0 (``[1.0]`` is :func:`one_step_sample`).
    The K - 1 fresh noises ``n_k`` are ``renoise`` (tensors shaped like ``noise``) when given,
    else drawn in order with ``torch.randn(noise.shape, generator=generator)`` on the
    generator's device -- the draws of diffusers' ``FlowMatchEulerDiscreteScheduler(
    stochastic_sampling=True)`` stepped with the same generator (which draws one more, at
    the last step, and multiplies it by the final sigma 0). Returns x0 [B, ...].
    """
    sigmas = _checked_levels(sigmas)
    if renoise is not None and len(renoise) != len(sigmas) - 1:
        raise ValueError(f"{len(sigmas)} steps re-noise {len(sigmas) - 1} times, got {len(renoise)} noises")
    x = noise
    for k, s in enumerate(sigmas):
        sigma = torch.full((noise.shape[0],), s, device=noise.device, dtype=noise.dtype)
        x0 = x0_from_velocity(x, sigma, velocity_fn(x, sigma))
        if k + 1 < len(sigmas):
            if renoise is not None:
                fresh = renoise[k]
            else:
                device = generator.device if generator is not None else noise.device
                fresh = torch.randn(noise.shape, generator=generator, device=device, dtype=noise.dtype)
            x = add_noise(x0, fresh.to(noise), sigmas[k + 1])
    return x0


def euler_step_sample(velocity_fn: VelocityFn, noise: Tensor, sigmas: Sequence[float]) -> Tensor:
    """Deterministic Euler sampler of a K-step student: ``x <- x + (s_{k+1} - s_k) v(x, s_k)``
    with ``s_K = 0``, so the last step is the clean estimate ``x - s_{K-1} v``. It follows the
    chords of the teacher's ODE that few-step KD regresses on; diffusers'
    ``FlowMatchEulerDiscreteScheduler`` (no ``stochastic_sampling``) with the same custom
    sigmas takes the same steps. noise: [B, ...] at ``sigmas[0] = 1``. Returns x0 [B, ...]."""
    sigmas = _checked_levels(sigmas)
    x = noise
    for s, s_next in zip(sigmas, sigmas[1:] + [0.0]):
        sigma = torch.full((noise.shape[0],), s, device=noise.device, dtype=noise.dtype)
        x = x + (s_next - s) * velocity_fn(x, sigma)
    return x


def student_sample(
    velocity_fn: VelocityFn,
    noise: Tensor,
    sigmas: Sequence[float],
    sampler: StudentSampler = "renoise",
    generator: torch.Generator | None = None,
) -> Tensor:
    """A K-step student's sample with its ``sampler`` (see :data:`StudentSampler`); the
    re-noising sampler draws its fresh noise from ``generator``. Returns x0 [B, ...]."""
    if sampler == "renoise":
        return few_step_sample(velocity_fn, noise, sigmas, generator)
    if sampler == "euler":
        return euler_step_sample(velocity_fn, noise, sigmas)
    raise ValueError(f"unknown student sampler {sampler!r}; expected 'renoise' or 'euler'")


def _checked_levels(sigmas: Sequence[float]) -> list[float]:
    """``sigmas`` as floats; ValueError unless they start at 1.0 and decrease above 0."""
    sigmas = [float(s) for s in sigmas]
    if not sigmas or sigmas[0] != 1.0:
        raise ValueError(f"few-step sigmas must start at 1.0, got {sigmas}")
    if any(b >= a for a, b in zip(sigmas, sigmas[1:])) or sigmas[-1] <= 0.0:
        raise ValueError(f"few-step sigmas must decrease and stay above 0, got {sigmas}")
    return sigmas
