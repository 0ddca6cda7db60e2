"""Phased DMD with phases of several student steps (``phase_boundaries``), against the closed
forms of Gaussian data (tests/gaussian_flow.py): a 4-step ladder split in the middle, two
phases of two steps. The carried state's subinterval noising has the forward marginal, the
fake score's subinterval target is minimised by the exact velocity (and score), the trained
step is drawn among exactly the phase's steps, and without boundaries the draws and losses are
the one-step-per-phase ones (draws bit for bit, losses to 1e-12)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from distill_pl.diffusion.flow import add_noise
from distill_pl.diffusion.student_steps import (
    experts_boundary,
    phase_steps,
    resolve_phase_boundaries,
    student_noise_levels,
    subinterval_bounds,
)
from distill_pl.methods.dmd2 import DMD2Draws, DMD2Objective
from distill_pl.models.conditioning import Conditioning
from distill_pl.util.randomness import step_generator
from tests.gaussian_flow import exact_score, exact_velocity, marginal_var

LEVELS = (1.0, 0.75, 0.5, 0.25)
BOUNDARY = (0.5,)
MU, S = 0.7, 0.3
#: samples per draw (elementwise independent) and draws: ~200k Gaussian samples per phase
ELEMENTS, DRAWS = 4096, 48


class GaussianStudent(nn.Module):
    """The exact few-step sampler of N(MU, S^2) data: at level ``s`` its clean estimate maps
    the marginal N((1 - s) MU, marginal_var(s)) onto the data, ``x0 = MU + S z`` with ``z``
    the standardised input; ``v = (x - x0) / s``. Records the levels it is called at."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(1.0))  # the gradient's way in
        self.levels: list[list[float]] = []

    def forward(self, x, sigma, cond, feature_block=None):
        self.levels.append(sigma.tolist())
        s = sigma.reshape(-1, 1, 1, 1, 1)
        x0 = MU + self.scale * S * (x - (1 - s) * MU) / marginal_var(s, S).sqrt()
        return (x - x0) / s


class AffineVelocity(nn.Module):
    """``v = alpha x + beta`` (the fake score; ``alpha``, ``beta`` plain tensors a test may
    swap for differentiable ones); records the inputs it is called at."""

    def __init__(self):
        super().__init__()
        self.alpha, self.beta = torch.tensor(0.0), torch.tensor(0.0)
        self.inputs: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, x, sigma, cond, feature_block=None):
        self.inputs.append((x.detach(), sigma.detach()))
        return self.alpha * x + self.beta


class Forbidden(nn.Module):
    def forward(self, *args, **kwargs):
        raise AssertionError("not called here")


def objective(student=None, fake_score=None, **kwargs) -> DMD2Objective:
    options = dict(student_sigmas=LEVELS, phased=True, phase_boundaries=BOUNDARY, gan_weight=0.0,
                   critic_gan_weight=0.0) | kwargs
    return DMD2Objective(student or GaussianStudent(), Forbidden(), fake_score or Forbidden(), Forbidden(),
                         feature_block=0, **options)


def conditioning(batch: int) -> Conditioning:
    return Conditioning(torch.zeros(batch, 1, 1), torch.ones(batch, 1, dtype=torch.bool))


def gaussian_draws(obj: DMD2Objective, phase: int, draws: int = DRAWS, seed: int = 0) -> DMD2Draws:
    """``draws`` samples of shape [1, 1, ELEMENTS, 1, 1] (each element one Gaussian sample)."""
    generators = [step_generator(seed, 3, stream=j) for j in range(draws)]
    return obj.draw_batch(generators, (draws, 1, ELEMENTS, 1, 1), torch.zeros(()), phase)


def standardised(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """``x`` [B, ...] at levels ``sigma`` [B] standardised by the forward marginal of the data."""
    s = sigma.reshape(-1, 1, 1, 1, 1)
    return (x - (1 - s) * MU) / marginal_var(s, S).sqrt()


def test_phases_of_a_boundary_in_the_middle():
    assert phase_steps(LEVELS, BOUNDARY) == [range(0, 2), range(2, 4)]
    assert subinterval_bounds(LEVELS, BOUNDARY) == [(0.5, 1.0), (0.0, 0.5)]
    assert phase_steps(LEVELS) == [range(k, k + 1) for k in range(4)]  # None: one step per phase
    assert subinterval_bounds(LEVELS) == [(0.75, 1.0), (0.5, 0.75), (0.25, 0.5), (0.0, 0.25)]
    assert objective().phase_steps == [range(0, 2), range(2, 4)]


def test_carried_state_noised_within_the_subinterval_has_the_forward_marginal():
    """(a) High phase: each sample's trained step (0 or 1, its input the student's own chain)
    is carried to the phase's lower end 0.5, not to x0; the critic's subinterval noising of that
    state to sigma in (0.5, 1) gives the forward marginal at sigma (mean and variance of the
    closed form). Low phase: the state is clean, noised as usual."""
    fake_score = AffineVelocity()
    obj = objective(fake_score=fake_score)
    draws = gaussian_draws(obj, phase=0)
    with torch.no_grad():
        out = obj.trained_step(draws, conditioning(DRAWS))
    assert set(draws.step.tolist()) == {0, 1}
    assert out.level.tolist() == [0.5] * DRAWS  # the phase's lower end for both steps
    rows = torch.arange(DRAWS)
    torch.testing.assert_close(out.sample, add_noise(out.x0, draws.renoise[rows, draws.step], out.level))
    z_s = standardised(out.sample, out.level)
    assert abs(z_s.mean().item()) < 0.015 and z_s.var().item() == pytest.approx(1.0, abs=0.015)

    obj.critic_loss(out.sample, None, draws.sigma, draws.noise, None, conditioning(DRAWS), level=out.level)
    x_t, sigma = fake_score.inputs[-1]
    assert ((sigma > 0.5) & (sigma < 1.0)).all()
    z_t = standardised(x_t, sigma)
    assert abs(z_t.mean().item()) < 0.015 and z_t.var().item() == pytest.approx(1.0, abs=0.015)
    # the state treated as clean (noised from 0) would not have the marginal
    wrong = standardised(add_noise(out.sample, draws.noise, sigma), sigma)
    assert wrong.mean().item() < -0.05

    low = gaussian_draws(obj, phase=1, seed=1)
    with torch.no_grad():
        out = obj.trained_step(low, conditioning(DRAWS))
    assert set(low.step.tolist()) == {2, 3} and out.level is None  # the last phase ends clean
    assert out.x0.mean().item() == pytest.approx(MU, abs=5e-3) and out.x0.std().item() == pytest.approx(S, rel=1e-2)
    obj.critic_loss(out.sample, None, low.sigma, low.noise, None, conditioning(DRAWS), level=out.level)
    x_t, sigma = fake_score.inputs[-1]
    assert ((sigma > 0.0) & (sigma < 0.5)).all()
    z_t = standardised(x_t, sigma)
    assert abs(z_t.mean().item()) < 0.015 and z_t.var().item() == pytest.approx(1.0, abs=0.015)


def test_subinterval_target_minimised_by_the_fake_score_is_the_exact_velocity_and_score():
    """(b) The critic loss of the high phase (the fake score's subinterval target on the state
    carried to 0.5, weighted by b^2 / t^2), minimised over affine velocities at a fixed t = 0.7,
    gives the exact velocity of the marginal at t, and with it the exact score."""
    t = 0.7
    fake_score = AffineVelocity()
    obj = objective(fake_score=fake_score)
    draws = gaussian_draws(obj, phase=0)
    draws.sigma = torch.full((DRAWS,), t)
    with torch.no_grad():
        out = obj.trained_step(draws, conditioning(DRAWS))

    def loss_at(params: torch.Tensor) -> torch.Tensor:  # differentiable in params
        fake_score.alpha, fake_score.beta = params[0], params[1]
        return obj.critic_loss(out.sample, None, draws.sigma, draws.noise, None, conditioning(DRAWS),
                               level=out.level)[0]

    start = torch.zeros(2)
    gradient = torch.autograd.functional.jacobian(loss_at, start)
    hessian = torch.autograd.functional.hessian(loss_at, start)
    alpha, beta = (start - torch.linalg.solve(hessian, gradient)).tolist()  # the quadratic's minimiser
    # the exact velocity is affine in x at fixed t: compare the coefficients (~4 standard errors)
    slope = (t - (1 - t) * S**2) / marginal_var(t, S)
    assert alpha == pytest.approx(slope, abs=0.015) and beta == pytest.approx(-MU - slope * (1 - t) * MU, abs=0.015)
    x = torch.linspace(-1.5, 1.5, 7)
    torch.testing.assert_close(alpha * x + beta, exact_velocity(x, t, MU, S), atol=0.03, rtol=0)
    x0_hat = x - t * (alpha * x + beta)  # the velocity's clean estimate, as a score
    torch.testing.assert_close(-(x - (1 - t) * x0_hat) / t**2, exact_score(x, t, MU, S), atol=0.05, rtol=0)


def test_trained_step_is_drawn_among_exactly_the_phases_steps():
    """(c) Over many samples each phase's draws cover exactly its steps, about evenly, and its
    noise levels stay in its interval; one batch may mix the steps of one phase, not two."""
    obj = objective()
    for phase, (steps, (lo, hi)) in enumerate(zip(phase_steps(LEVELS, BOUNDARY), subinterval_bounds(LEVELS, BOUNDARY))):
        draws = obj.draw_batch([step_generator(7, 0, stream=j) for j in range(400)], (400, 1, 1, 1, 1),
                               torch.zeros(()), phase)
        counts = torch.bincount(draws.step, minlength=len(LEVELS))
        assert {k for k in range(len(LEVELS)) if counts[k]} == set(steps)
        assert counts[list(steps)].min().item() > 150
        assert ((draws.sigma > lo) & (draws.sigma < hi)).all()
    student = GaussianStudent()
    obj = objective(student)
    draws = gaussian_draws(obj, phase=1, draws=3)
    draws.step = torch.tensor([2, 3, 2])
    with torch.no_grad():
        obj.trained_step(draws, conditioning(3))  # steps 2 and 3: one phase
    draws.step = torch.tensor([1, 2, 2])
    student.levels.clear()
    with pytest.raises(ValueError, match=r"one phase per batch.*\[1, 2\] of the phases \[0, 1\]"):
        obj.trained_step(draws, conditioning(3))
    assert student.levels == []


def test_phase_boundaries_errors_name_the_setting():
    for bad, message in (((0.6,), "not among the student's levels"), ((0.25, 0.5), "decrease strictly"),
                         ((1.0,), r"inside \(0, 1\)"), ((0.0,), r"inside \(0, 1\)")):
        with pytest.raises(ValueError, match=message) as error:
            objective(phase_boundaries=bad)
        assert str(error.value).startswith("phase_boundaries") and "\n" not in str(error.value)
    with pytest.raises(ValueError, match="phase_boundaries is a setting of Phased DMD"):
        objective(phased=False)


def wan_routing(sigma: torch.Tensor) -> torch.Tensor:
    """A two-expert routing at boundary_ratio 0.875 compared on float32 timesteps (Wan 2.2's)."""
    return (1000.0 * sigma.double()).float() < 875.0


def test_experts_boundary_is_the_first_level_of_the_low_noise_expert():
    assert experts_boundary(wan_routing) == 0.875
    assert experts_boundary(lambda sigma: None) is None
    shift = 5.0
    sigmas = [1.0, 0.75, 0.5, 0.25]
    levels = student_noise_levels(sigmas, shift, shifted=False)  # 1, 0.9375, 0.833.., 0.625
    assert resolve_phase_boundaries("experts", sigmas, levels, wan_routing) == (levels[2],)
    assert resolve_phase_boundaries("experts", sigmas, (1.0, 0.875, 0.87, 0.5), wan_routing) == (0.87,)
    assert resolve_phase_boundaries(None, sigmas, levels, wan_routing) is None
    assert resolve_phase_boundaries([0.5], sigmas, levels, wan_routing) == (levels[2],)
    # every level on one expert: the message names the experts' boundary
    for one_side, expert in (((1.0, 0.9375, 0.875), "high"), ((0.5, 0.25), "low")):
        with pytest.raises(ValueError, match=rf"all run on the {expert}-noise expert.*boundary sigma 0.875") as error:
            resolve_phase_boundaries("experts", list(one_side), one_side, wan_routing)
        assert "\n" not in str(error.value) and str(error.value).startswith("phase_boundaries")
    with pytest.raises(ValueError, match="needs a two-expert student"):
        resolve_phase_boundaries("experts", sigmas, tuple(sigmas), lambda sigma: None)
    with pytest.raises(ValueError, match="phase_boundaries must be a list"):
        resolve_phase_boundaries("expert", sigmas, tuple(sigmas), wan_routing)


class Affine(nn.Module):
    """``v = w x + c sigma`` in float64."""

    def __init__(self, w: float, c: float):
        super().__init__()
        self.w, self.c = nn.Parameter(torch.tensor(w, dtype=torch.float64)), c

    def forward(self, x, sigma, cond, feature_block=None):
        return self.w * x + self.c * sigma.reshape(-1, 1, 1, 1, 1)


#: (phased, phase) -> draws' sigma and step, and the critic and generator losses, as float.hex,
#: recorded with the one-step-per-phase implementation before phase_boundaries existed
#: (commit 099d296, 2026-12-07; CPU, float64 draws)
RECORDED = {
    (False, 0): (["0x1.8e9d940000000p-1", "0x1.827bae0000000p-1", "0x1.1421a20000000p-2"], [3, 1, 1],
                 "0x1.7dd6600000000p+0", "0x1.ebf6da0000000p-3"),
    (True, 0): (["0x1.e3a7640000000p-1", "0x1.e09eec0000000p-1", "0x1.a284340000000p-1"], [0, 0, 0],
                "0x1.6d12680000000p+3", "0x1.4907360000000p-3"),
    (True, 1): (["0x1.63a7640000000p-1", "0x1.609eec0000000p-1", "0x1.2284340000000p-1"], [1, 1, 1],
                "0x1.c298da0000000p+1", "0x1.ec9b100000000p-3"),
    (True, 3): (["0x1.8e9d940000000p-3", "0x1.827bae0000000p-3", "0x1.1421a20000000p-4"], [3, 3, 3],
                "0x1.7d369e0000000p+0", "0x1.fc4b460000000p-5"),
}


@pytest.mark.parametrize("phased, phase", list(RECORDED))
def test_without_boundaries_draws_and_losses_are_the_recorded_ones(phased, phase):
    """(d) phase_boundaries None: the draws (their order: no step drawn under Phased DMD) and
    both losses equal those recorded before the setting existed: the draws to the last bit, the
    losses to 1e-12 relative (a reduction's summation order may differ between CPUs; any change of
    draws or formulas moves them far more)."""
    obj = DMD2Objective(Affine(0.3, 1.0), Affine(-0.4, 0.5), Affine(0.1, -0.2), nn.Identity(), feature_block=0,
                        guidance=1.0, gan_weight=0.0, critic_gan_weight=0.0, student_sigmas=LEVELS, phased=phased)
    shape = (3, 1, 2, 2, 2)
    cond = Conditioning(torch.zeros(3, 1, 1, dtype=torch.float64), torch.ones(3, 1, dtype=torch.bool))
    draws = obj.draw_batch([step_generator(11, 7, stream=j) for j in range(3)], shape,
                           torch.zeros((), dtype=torch.float64), phase)
    x_real = torch.randn(shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    with torch.no_grad():
        out = obj.trained_step(draws, cond, x_real)
        critic, _ = obj.critic_loss(out.sample, x_real, draws.sigma, draws.noise, draws.noise_real, cond,
                                    level=out.level)
    out = obj.trained_step(draws, cond, x_real)
    generator, _ = obj.generator_loss(out.sample, draws.sigma, draws.noise, cond, None, level=out.level, x0=out.x0)
    sigma, step, critic_hex, generator_hex = RECORDED[(phased, phase)]
    assert [x.hex() for x in draws.sigma.tolist()] == sigma and draws.step.tolist() == step
    assert critic.item() == pytest.approx(float.fromhex(critic_hex), rel=1e-12, abs=0)
    assert generator.item() == pytest.approx(float.fromhex(generator_hex), rel=1e-12, abs=0)
