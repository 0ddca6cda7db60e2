import pytest
import torch

from distill_pl.diffusion.sampling import (
    build_flow_scheduler,
    euler_step_sample,
    few_step_sample,
    one_step_sample,
    sample_with_scheduler,
    student_sample,
)
from tests.gaussian_flow import exact_velocity

MU, S = 0.8, 0.4


def exact(x, sigma):
    return exact_velocity(x, sigma, MU, S)


def _flow_error(name: str, steps: int) -> float:
    # For Gaussian data the probability-flow ODE from sigma = 1 maps eps to mu + s * eps.
    eps = torch.randn(16, 32, generator=torch.Generator().manual_seed(0))
    out = sample_with_scheduler(exact, eps, build_flow_scheduler(name, shift=3.0), steps)
    return (out - (MU + S * eps)).abs().max().item()


def test_unipc_sampling_follows_the_exact_probability_flow():
    # UniPC (2nd order, 36 steps, shift 3 as Wan) stays within 1% of the exact endpoint
    assert _flow_error("unipc", 36) < 0.015


def test_euler_sampling_converges_at_first_order():
    coarse, fine = _flow_error("euler", 100), _flow_error("euler", 200)
    assert fine < 0.04
    assert 0.4 < fine / coarse < 0.6  # halving the step halves the error


def test_one_step_sample_is_posterior_mean_at_sigma_one():
    eps = torch.randn(8, 10)
    torch.testing.assert_close(one_step_sample(exact, eps), torch.full_like(eps, MU))


def test_one_step_sample_is_eps_minus_v():
    eps = torch.randn(3, 4)
    v = torch.randn(3, 4)
    torch.testing.assert_close(one_step_sample(lambda x, s: v, eps), eps - v)


def test_few_step_sample_of_point_mass_and_bad_sigmas():
    eps = torch.randn(8, 10)
    point = lambda x, s: exact_velocity(x, s, MU, 0.0)  # noqa: E731
    torch.testing.assert_close(few_step_sample(point, eps, [1.0, 0.6, 0.3]), torch.full_like(eps, MU))
    with pytest.raises(ValueError, match="start at 1.0"):
        few_step_sample(point, eps, [0.9, 0.5])


def test_unknown_scheduler_name():
    with pytest.raises(ValueError, match="unknown scheduler"):
        build_flow_scheduler("ddim")


def test_few_step_sample_renoises_with_the_given_or_the_generators_noise():
    eps = torch.randn(4, 6, generator=torch.Generator().manual_seed(0))
    sigmas = [1.0, 0.7, 0.4]
    g = torch.Generator().manual_seed(3)
    fresh = [torch.randn(eps.shape, generator=g) for _ in range(2)]
    by_generator = few_step_sample(exact, eps, sigmas, torch.Generator().manual_seed(3))
    torch.testing.assert_close(few_step_sample(exact, eps, sigmas, renoise=fresh), by_generator)
    # by hand: x0 at each level, re-noised to the next with the fresh noise
    x = eps
    for k, s in enumerate(sigmas):
        x0 = x - s * exact(x, torch.full((4,), s))
        if k + 1 < len(sigmas):
            x = (1 - sigmas[k + 1]) * x0 + sigmas[k + 1] * fresh[k]
    torch.testing.assert_close(by_generator, x0)
    torch.testing.assert_close(few_step_sample(exact, eps, [1.0]), one_step_sample(exact, eps))
    with pytest.raises(ValueError, match="decrease"):
        few_step_sample(exact, eps, [1.0, 0.5, 0.6])
    with pytest.raises(ValueError, match="re-noise 2 times"):
        few_step_sample(exact, eps, sigmas, renoise=fresh[:1])


def test_few_step_sample_equals_stochastic_flow_match_euler_with_custom_sigmas():
    """diffusers' FlowMatchEulerDiscreteScheduler(stochastic_sampling=True) at custom sigmas,
    stepped with the same generator, is the project's re-noising sampler."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    eps = torch.randn(3, 5, generator=torch.Generator().manual_seed(1))
    sigmas = [1.0, 0.75, 0.5, 0.25]
    scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0, stochastic_sampling=True)
    scheduler.set_timesteps(sigmas=sigmas)
    g = torch.Generator().manual_seed(4)
    x = eps
    for t, s in zip(scheduler.timesteps, scheduler.sigmas):
        x = scheduler.step(exact(x, torch.full((3,), float(s))), t, x, generator=g, return_dict=False)[0]
    torch.testing.assert_close(x, few_step_sample(exact, eps, sigmas, torch.Generator().manual_seed(4)))


def test_euler_step_sample_is_exact_for_a_point_mass_and_converges_for_a_gaussian():
    """Deterministic Euler between a student's levels: a point mass's velocity is constant
    along each straight line, so any levels land on it; for Gaussian data the probability-flow
    ODE maps eps to mu + s eps and Euler's error shrinks at first order as levels are added."""
    eps = torch.randn(16, 32, generator=torch.Generator().manual_seed(0))
    point = lambda x, s: exact_velocity(x, s, MU, 0.0)  # noqa: E731
    torch.testing.assert_close(euler_step_sample(point, eps, [1.0, 0.6, 0.3]), torch.full_like(eps, MU))
    target = MU + S * eps
    errors = [(euler_step_sample(exact, eps, [1 - k / n for k in range(n)]) - target).abs().max().item()
              for n in (2, 4, 8, 16)]
    assert errors[0] > 0.01 and all(b < 0.65 * a for a, b in zip(errors, errors[1:])), errors
    # one step is the one-step sampler, whatever the sampler
    torch.testing.assert_close(euler_step_sample(exact, eps, [1.0]), one_step_sample(exact, eps))
    with pytest.raises(ValueError, match="decrease"):
        euler_step_sample(exact, eps, [1.0, 0.5, 0.6])


def test_euler_step_sample_equals_flow_match_euler_with_custom_sigmas():
    """diffusers' FlowMatchEulerDiscreteScheduler (not stochastic) at custom sigmas takes the
    project's deterministic student steps."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    eps = torch.randn(3, 5, generator=torch.Generator().manual_seed(1))
    sigmas = [1.0, 0.75, 0.5, 0.25]
    scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0)
    scheduler.set_timesteps(sigmas=sigmas)
    x = eps
    for t, s in zip(scheduler.timesteps, scheduler.sigmas):
        x = scheduler.step(exact(x, torch.full((3,), float(s))), t, x, return_dict=False)[0]
    torch.testing.assert_close(x, euler_step_sample(exact, eps, sigmas))


def test_student_sample_picks_the_sampler():
    eps = torch.randn(3, 5, generator=torch.Generator().manual_seed(2))
    sigmas = [1.0, 0.5]
    torch.testing.assert_close(student_sample(exact, eps, sigmas, "euler"), euler_step_sample(exact, eps, sigmas))
    torch.testing.assert_close(student_sample(exact, eps, sigmas, "renoise", torch.Generator().manual_seed(5)),
                               few_step_sample(exact, eps, sigmas, torch.Generator().manual_seed(5)))
    with pytest.raises(ValueError, match="unknown student sampler 'ddim'"):
        student_sample(exact, eps, sigmas, "ddim")
