"""DMD2Objective's few-step trained step, its draws and the Phased DMD subinterval math."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from distill_pl.diffusion.flow import add_noise, x0_from_velocity
from distill_pl.diffusion.losses import sample_training_sigma
from distill_pl.diffusion.student_steps import (
    diffuse_from,
    student_noise_levels,
    subinterval_bounds,
    subinterval_flow_target,
    unshift_sigma,
)
from distill_pl.models.conditioning import Conditioning
from distill_pl.methods.dmd2 import DMD2Objective
from distill_pl.util.randomness import randn, step_generator
from tests.gaussian_flow import exact_velocity, marginal_var

LEVELS = (1.0, 0.75, 0.5, 0.25)
SHAPE = (3, 1, 2, 2, 2)  # [B, C, T, H, W]


class RecordingStudent(nn.Module):
    """``v = w * x + sigma`` (one parameter); records each call's input, sigma and whether
    gradients were enabled."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(0.3))
        self.calls: list[tuple[torch.Tensor, torch.Tensor, bool]] = []

    def forward(self, x, sigma, cond, feature_block=None):
        self.calls.append((x.detach().clone(), sigma.detach().clone(), torch.is_grad_enabled()))
        return self.w * x + sigma.reshape(-1, 1, 1, 1, 1)


class Forbidden(nn.Module):
    def forward(self, *args, **kwargs):
        raise AssertionError("the trained step must not call this network")


def objective(student, **kwargs) -> DMD2Objective:
    return DMD2Objective(student, Forbidden(), Forbidden(), Forbidden(), feature_block=0, **kwargs)


def draws_for(obj: DMD2Objective, seed: int = 0, phase: int = 0):
    from distill_pl.methods.dmd2 import DMD2Draws

    like = torch.zeros(())
    return DMD2Draws.cat([obj.draw(step_generator(seed, 0, stream=j), (1, *SHAPE[1:]), like, phase)
                          for j in range(SHAPE[0])])


COND = Conditioning(torch.zeros(SHAPE[0], 1, 1), torch.ones(SHAPE[0], 1, dtype=torch.bool))


def test_backward_simulation_trains_the_last_step_on_the_students_own_state():
    student = RecordingStudent()
    obj = objective(student, student_sigmas=LEVELS)
    draws = draws_for(obj)
    draws.step = torch.tensor([2, 0, 3])
    out = obj.trained_step(draws, COND)
    # the student's own chain, by hand: per sample, steps 0 .. k-1 re-noised with its draws
    w = student.w.detach()
    expected_inputs = []
    for j, k in enumerate(draws.step.tolist()):
        x = draws.eps[j:j + 1]
        for i in range(k):
            x0 = x - LEVELS[i] * (w * x + LEVELS[i])
            x = add_noise(x0, draws.renoise[j:j + 1, i], LEVELS[i + 1])
        expected_inputs.append(x)
    chain, trained = student.calls[:-1], student.calls[-1]
    assert len(chain) == 3 and not any(grad for _, _, grad in chain)  # steps 0..2 without gradient
    x_in, sigma_in, grad = trained
    assert grad
    torch.testing.assert_close(x_in, torch.cat(expected_inputs))
    torch.testing.assert_close(sigma_in, torch.tensor([LEVELS[2], LEVELS[0], LEVELS[3]]))
    assert not torch.equal(x_in[0], draws.eps[0])  # an intermediate state, not the noise
    # gradient through the last step only: d x0 / d w = -s_k * x_in (x_in is a constant)
    out.sample.sum().backward()
    torch.testing.assert_close(student.w.grad, -(sigma_in.reshape(-1, 1, 1, 1, 1) * x_in).sum())
    assert out.level is None and out.sample is out.x0


def test_noised_real_input_is_the_real_clip_at_the_steps_level():
    student = RecordingStudent()
    obj = objective(student, student_sigmas=LEVELS, trained_step_input="noised_real")
    draws = draws_for(obj)
    draws.step = torch.tensor([1, 0, 3])
    x_real = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
    obj.trained_step(draws, COND, x_real)
    assert len(student.calls) == 1  # no chain
    x_in = student.calls[0][0]
    torch.testing.assert_close(x_in[0], add_noise(x_real[:1], draws.renoise[:1, 0], LEVELS[1])[0])
    torch.testing.assert_close(x_in[1], draws.eps[1])
    torch.testing.assert_close(x_in[2], add_noise(x_real[2:], draws.renoise[2:, 2], LEVELS[3])[0])
    with pytest.raises(ValueError, match="real clips"):
        obj.trained_step(draws, COND)


def test_one_step_draws_are_eps_sigma_noise_noise_real_in_order():
    obj = objective(RecordingStudent(), shift=3.0)
    draws = draws_for(obj, seed=5)
    for j in range(SHAPE[0]):
        g = step_generator(5, 0, stream=j)
        like = torch.zeros(())
        eps = randn((1, *SHAPE[1:]), g, like)
        sigma = sample_training_sigma(1, 3.0, 0.02, 0.98, generator=g)
        noise, noise_real = randn((1, *SHAPE[1:]), g, like), randn((1, *SHAPE[1:]), g, like)
        for got, want in ((draws.eps, eps), (draws.sigma, sigma), (draws.noise, noise), (draws.noise_real, noise_real)):
            torch.testing.assert_close(got[j:j + 1], want)
    assert draws.step.tolist() == [0, 0, 0] and draws.renoise.shape == (3, 0, *SHAPE[1:])


def test_phased_draws_stay_in_the_phases_subinterval_and_train_its_step():
    obj = objective(RecordingStudent(), student_sigmas=LEVELS, phased=True)
    bounds = subinterval_bounds(LEVELS)
    assert bounds == [(0.75, 1.0), (0.5, 0.75), (0.25, 0.5), (0.0, 0.25)]
    for phase, (lo, hi) in enumerate(bounds):
        draws = draws_for(obj, phase=phase)
        assert (draws.step == phase).all()
        assert ((draws.sigma > lo) & (draws.sigma < hi)).all()
    with pytest.raises(ValueError, match="backward_simulation"):
        objective(RecordingStudent(), student_sigmas=LEVELS, phased=True, trained_step_input="noised_real")


def test_phased_trained_step_outputs_the_state_at_the_next_level():
    student = RecordingStudent()
    obj = objective(student, student_sigmas=LEVELS, phased=True)
    draws = draws_for(obj, phase=1)
    out = obj.trained_step(draws, COND)
    x_in, sigma_in, _ = student.calls[-1]
    x0 = x0_from_velocity(x_in, sigma_in, student.w.detach() * x_in + sigma_in.reshape(-1, 1, 1, 1, 1))
    torch.testing.assert_close(out.x0.detach(), x0)
    torch.testing.assert_close(out.level, torch.full((3,), 0.5))
    torch.testing.assert_close(out.sample.detach(), add_noise(x0, draws.renoise[:, 1], 0.5))
    last = obj.trained_step(draws_for(obj, phase=3), COND)
    assert last.level is None  # the last phase ends clean


def test_student_noise_levels_shift_and_validation():
    assert student_noise_levels([1.0, 0.5], 3.0, shifted=False) == (1.0, 0.75)
    assert student_noise_levels([1.0, 0.5], 3.0, shifted=True) == (1.0, 0.5)
    assert unshift_sigma(0.75, 3.0) == pytest.approx(0.5)
    for bad in ([0.9, 0.5], [1.0, 0.5, 0.5], [1.0, 0.0], []):
        with pytest.raises(ValueError, match="student_sigmas"):
            student_noise_levels(bad, 1.0, shifted=True)


MU, S = 0.7, 0.3


def test_diffuse_from_gives_the_marginal_at_the_higher_level():
    g = torch.Generator().manual_seed(0)
    n = 400_000
    s, t = torch.full((n,), 0.3), torch.full((n,), 0.6)
    x_s = add_noise(MU + S * torch.randn(n, generator=g), torch.randn(n, generator=g), s)
    x_t = diffuse_from(x_s, s, t, torch.randn(n, generator=g))
    assert x_t.mean().item() == pytest.approx((1 - 0.6) * MU, abs=5e-3)
    assert x_t.var().item() == pytest.approx(marginal_var(0.6, S), rel=1e-2)
    torch.testing.assert_close(diffuse_from(x_s, torch.zeros(n), t, x_s), add_noise(x_s, x_s, t))


def test_subinterval_target_is_minimised_by_the_exact_velocity():
    """Gaussian data: with only x_s known, the weighted subinterval loss is smallest at the exact
    velocity of the marginal at t (its minimiser, the conditional mean of the target), and
    s = 0 gives the usual target eps - x0 with weight 1."""
    g = torch.Generator().manual_seed(1)
    n = 400_000
    s, t = torch.full((n,), 0.3), torch.full((n,), 0.55)
    x_s = add_noise(MU + S * torch.randn(n, generator=g), torch.randn(n, generator=g), s)
    x_t = diffuse_from(x_s, s, t, torch.randn(n, generator=g))
    target, weight = subinterval_flow_target(x_t, t, x_s, s)
    exact = exact_velocity(x_t, t, MU, S)

    def loss(v):
        return (weight * (v - target).square()).mean().item()

    for offset in (0.05, -0.05):
        assert loss(exact) < loss(exact + offset)
        assert loss(exact) < loss(exact * (1 + offset))
    # the residual is uncorrelated with functions of x_t (conditional mean)
    residual = weight * (target - exact)
    for feature in (torch.ones_like(x_t), x_t):
        assert abs((residual * feature).mean().item()) < 5e-3
    x0, eps = torch.randn(5, generator=g), torch.randn(5, generator=g)
    sg = torch.full((5,), 0.4)
    v0, w0 = subinterval_flow_target(add_noise(x0, eps, sg), sg, x0, torch.zeros(5))
    torch.testing.assert_close(v0, eps - x0)
    torch.testing.assert_close(w0, torch.ones(5))
