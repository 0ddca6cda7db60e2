"""Acceptance of the few-step DMD objective on an exact 2-D Gaussian-mixture teacher.

Data: an equal mixture of four N(mu_i, 0.25^2 I) at (+-1.5, +-1.5); the teacher's velocity is
the closed form of :func:`tests.gaussian_flow.mixture_x0`. Students (small MLPs, the same
initial weights) are trained with :class:`DMD2Objective` -- the project's critic and generator
losses, the 4:1 alternation, a learned fake score -- for the same number of generator updates,
one with one step, one with four (backward simulation). Both must move toward the data, and the
4-step student must end closer to it (energy distance).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from distill_pl.diffusion.flow import velocity_from_x0
from distill_pl.diffusion.losses import flow_matching_loss, sample_training_sigma
from distill_pl.diffusion.student_steps import subinterval_bounds
from distill_pl.models.conditioning import Conditioning
from distill_pl.methods.dmd2 import DMD2Draws, DMD2Objective
from tests.gaussian_flow import energy_distance, mixture_x0

MEANS = torch.tensor([[1.5, 1.5], [1.5, -1.5], [-1.5, 1.5], [-1.5, -1.5]])
STD = 0.25
#: generator updates of each student (4 critic updates before each)
GENERATOR_UPDATES = 300


class MixtureTeacher(nn.Module):
    """The exact velocity of the mixture (no parameters). ``uncond_std``: a CFG teacher whose
    unconditional branch (rows whose text embedding is 0) is the mixture of the same means with
    this std; None: one distribution, whatever the conditioning."""

    def __init__(self, uncond_std: float | None = None):
        super().__init__()
        self.uncond_std = uncond_std

    def forward(self, x, sigma, cond, feature_block=None):
        x0 = mixture_x0(x, sigma, MEANS, STD)
        if self.uncond_std is not None:
            conditional = cond.text_embeds.flatten(1)[:, :1] != 0
            x0 = torch.where(conditional, x0, mixture_x0(x, sigma, MEANS, self.uncond_std))
        v = velocity_from_x0(x, sigma, x0)
        return v if feature_block is None else (v, x)


class VelocityMLP(nn.Module):
    """``v(x, sigma)`` for 2-D points: an MLP on (x, sigma); ``feature_block`` gives its last hidden layer."""

    def __init__(self, hidden: int = 64):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(3, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU())
        self.head = nn.Linear(hidden, 2)

    def forward(self, x, sigma, cond, feature_block=None):
        h = self.body(torch.cat([x, sigma[:, None].to(x)], dim=1))
        v = self.head(h)
        return v if feature_block is None else (v, h)


def data(n: int, g: torch.Generator) -> torch.Tensor:
    which = torch.randint(len(MEANS), (n,), generator=g)
    return MEANS[which] + STD * torch.randn(n, 2, generator=g)


def flow_matching_init(steps: int = 400, batch: int = 256, seed: int = 0) -> VelocityMLP:
    """A VelocityMLP fitted to the data by flow matching: the initial student and fake score
    of both runs (DMD2 starts both from the teacher's network)."""
    torch.manual_seed(seed)
    net = VelocityMLP()
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(seed + 2)
    for _ in range(steps):
        x0, eps = data(batch, g), torch.randn(batch, 2, generator=g)
        sigma = torch.rand(batch, generator=g)
        loss = flow_matching_loss(lambda x, s: net(x, s, None), x0, eps, sigma)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return net


def conditioning(batch: int, value: float) -> Conditioning:
    """A [batch, 1, 1] text embedding of ``value`` (0: the unconditional branch of MixtureTeacher)."""
    return Conditioning(torch.full((batch, 1, 1), value), torch.ones(batch, 1, dtype=torch.bool))


def reference_samples() -> torch.Tensor:
    """2000 fixed samples [2000, 2] of the data (the teacher's distribution)."""
    return data(2000, torch.Generator().manual_seed(99))


@torch.no_grad()
def evaluation_samples(generate) -> torch.Tensor:
    """2000 samples [2000, 2] of a student's ``generate(noise, cond, generator)`` from fixed noise."""
    return generate(torch.randn(2000, 2, generator=torch.Generator().manual_seed(7)), conditioning(2000, 1.0),
                    torch.Generator().manual_seed(8))


def train(init: VelocityMLP, levels: tuple[float, ...], generator_updates: int, batch: int = 256, seed: int = 0,
          trained_step_input: str = "backward_simulation", phased: bool = False, teacher: nn.Module | None = None,
          guidance: float = 1.0, **decoupled):
    """(before, after, objective): the energy distances to the data of a student with ``levels``
    trained by DMD2Objective, and that objective (its trained student: ``objective.generate``).
    ``teacher``: MixtureTeacher() by default; ``decoupled``: the objective's Decoupled DMD
    settings (its own schedule's draws are drawn after the others)."""
    student, fake_score = copy.deepcopy(init), copy.deepcopy(init)
    objective = DMD2Objective(
        student, teacher or MixtureTeacher(), fake_score, nn.Linear(student.head.in_features, 1), feature_block=0,
        guidance=guidance, gan_weight=0.0, critic_gan_weight=0.0, student_sigmas=levels,
        trained_step_input=trained_step_input, phased=phased, **decoupled,
    )
    opt_g = torch.optim.Adam(student.parameters(), lr=1e-3)
    opt_f = torch.optim.Adam(fake_score.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(seed + 1)
    cond, uncond = conditioning(batch, 1.0), conditioning(batch, 0.0)
    k = len(levels)
    reference = reference_samples()

    def distance() -> float:
        return energy_distance(evaluation_samples(objective.generate), reference)

    before = distance()
    bounds = subinterval_bounds(levels)
    for step in range(5 * generator_updates):
        # the objective's draws (DMD2Objective.draw), batched: Phased DMD trains one step per
        # phase (an equal share of the generator updates each) within its subinterval
        phase = min(step // 5 * k // generator_updates, k - 1)
        t = sample_training_sigma(batch, 1.0, 0.02, 0.98, generator=g)
        lo, hi = bounds[phase]
        draws = DMD2Draws(
            eps=torch.randn(batch, 2, generator=g),
            sigma=lo + (hi - lo) * t if phased else t,
            noise=torch.randn(batch, 2, generator=g),
            noise_real=torch.randn(batch, 2, generator=g),
            step=torch.full((batch,), phase) if phased else torch.randint(k, (batch,), generator=g),
            renoise=torch.randn(batch, k - 1, 2, generator=g),
        )
        if objective.decoupled_schedule:
            for term, (t_lo, t_hi) in (("dm", objective.dm_t_range), ("ca", objective.ca_t_range)):
                t = sample_training_sigma(batch, 1.0, t_lo, t_hi, generator=g)
                setattr(draws, f"sigma_{term}", lo + (hi - lo) * t if phased else t)
                setattr(draws, f"noise_{term}", torch.randn(batch, 2, generator=g))
        x_real = data(batch, g)
        if step % 5 < 4:
            with torch.no_grad():
                out = objective.trained_step(draws, cond, x_real)
            loss, _ = objective.critic_loss(out.sample, x_real, draws.sigma, draws.noise, draws.noise_real, cond,
                                            level=out.level)
            opt = opt_f
        else:
            out = objective.trained_step(draws, cond, x_real)
            loss, _ = objective.generator_loss(out.sample, draws.sigma, draws.noise, cond, uncond, level=out.level,
                                               x0=out.x0, sigma_dm=draws.sigma_dm, noise_dm=draws.noise_dm,
                                               sigma_ca=draws.sigma_ca, noise_ca=draws.noise_ca)
            opt = opt_g
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return before, distance(), objective


def test_four_step_dmd_student_ends_closer_to_the_mixture_than_the_one_step_student(one_thread):
    init = flow_matching_init()
    four = (1.0, 0.75, 0.5, 0.25)
    before_1, after_1, _ = train(init, (1.0,), GENERATOR_UPDATES, batch=128)
    before_4, after_4, _ = train(init, four, GENERATOR_UPDATES, batch=128)
    _, after_phased, _ = train(init, four, GENERATOR_UPDATES, batch=128, phased=True)
    print(f"energy distance to the data: 1-step {before_1:.4f} -> {after_1:.4f}, 4-step {before_4:.4f} -> "
          f"{after_4:.4f} (backward simulation), {after_phased:.4f} (Phased DMD)")
    assert after_1 < 0.5 * before_1 and after_4 < 0.5 * before_4  # both move toward the data
    assert after_4 < 0.75 * after_1
    assert after_phased < 0.5 * before_4 and after_phased < 0.75 * after_1
