"""KDObjective on synthetic batches in the pairs contract: one step as before, K steps on the
teacher's trajectory (``teacher_trajectory`` [B, K-1, C, T, H, W], ``trajectory_sigmas`` [B, K-1])."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from distill_pl.diffusion.sampling import one_step_sample
from distill_pl.models.conditioning import Conditioning
from distill_pl.methods.kd import KDObjective, kd_loss
from tests.gaussian_flow import exact_velocity

SHAPE = (2, 1, 2, 3, 3)
COND = Conditioning(torch.zeros(2, 1, 1), torch.ones(2, 1, dtype=torch.bool))
MU, S = 0.6, 0.3


class LinearStudent(nn.Module):
    """``v = a x + b sigma`` with recorded inputs."""

    def __init__(self, a: float, b: float):
        super().__init__()
        self.a, self.b = nn.Parameter(torch.tensor(a)), nn.Parameter(torch.tensor(b))
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, x, sigma, cond, feature_block=None):
        self.calls.append((x.detach(), sigma.detach()))
        return self.a * x + self.b * sigma.reshape(-1, 1, 1, 1, 1)


class ExactStudent(nn.Module):
    """The exact velocity of Gaussian data N(MU, S^2)."""

    def forward(self, x, sigma, cond, feature_block=None):
        return exact_velocity(x, sigma, MU, S)


def batch(k: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return dict(
        noise=torch.randn(SHAPE, generator=g),
        teacher_output=torch.randn(SHAPE, generator=g),
        teacher_trajectory=torch.randn(SHAPE[0], k - 1, *SHAPE[1:], generator=g),
        trajectory_sigmas=torch.tensor([[0.74, 0.49, 0.24], [0.73, 0.5, 0.22]])[:, : k - 1],
    )


def test_one_step_loss_is_the_one_step_kd_loss():
    student = LinearStudent(0.2, -0.4)
    b = batch(1)
    got = KDObjective(student).loss(b["noise"], b["teacher_output"], COND)
    expected = kd_loss(one_step_sample(lambda x, s: student(x, s, COND), b["noise"]), b["teacher_output"])
    assert torch.equal(got, expected)


def test_four_step_loss_regresses_each_euler_step_on_the_next_teacher_state():
    student = LinearStudent(0.2, -0.4)
    b = batch(4)
    loss = KDObjective(student, (1.0, 0.75, 0.5, 0.25)).loss(
        b["noise"], b["teacher_output"], COND, b["teacher_trajectory"], b["trajectory_sigmas"])
    # by hand: inputs eps and the three stored states at their stored sigmas
    states = [b["noise"], *b["teacher_trajectory"].unbind(1), b["teacher_output"]]
    sig = torch.cat([torch.ones(2, 1), b["trajectory_sigmas"], torch.zeros(2, 1)], dim=1)
    terms = []
    for k in range(4):
        r, r_next = sig[:, k].reshape(-1, 1, 1, 1, 1), sig[:, k + 1].reshape(-1, 1, 1, 1, 1)
        v = 0.2 * states[k] - 0.4 * r
        terms.append(((states[k] + (r_next - r) * v - states[k + 1]) ** 2).mean())
    torch.testing.assert_close(loss, torch.stack(terms).mean())
    for (x, sigma), state, level in zip(student.calls, states, sig.T):
        torch.testing.assert_close(x, state)
        torch.testing.assert_close(sigma, level)
    loss.backward()
    assert student.a.grad is not None and student.b.grad is not None


def test_a_student_on_the_teachers_own_euler_path_has_zero_loss():
    """Trajectory = the Euler path of the exact velocity at the stored sigmas: the exact
    student reproduces every next state, so the loss is 0; a perturbed one has a positive loss."""
    g = torch.Generator().manual_seed(2)
    eps = torch.randn(SHAPE, generator=g)
    sig = torch.tensor([[1.0, 0.7, 0.45, 0.2, 0.0]] * 2)
    states = [eps]
    for k in range(4):
        r, r_next = sig[:, k].reshape(-1, 1, 1, 1, 1), sig[:, k + 1].reshape(-1, 1, 1, 1, 1)
        states.append(states[-1] + (r_next - r) * exact_velocity(states[-1], sig[:, k], MU, S))
    trajectory = torch.stack(states[1:4], dim=1)
    objective = KDObjective(ExactStudent(), (1.0, 0.75, 0.5, 0.25))
    loss = objective.loss(eps, states[4], COND, trajectory, sig[:, 1:4])
    assert loss.item() < 1e-10
    perturbed = objective.loss(eps, states[4] + 0.1, COND, trajectory, sig[:, 1:4])
    assert perturbed.item() == pytest.approx(0.1**2 / 4, rel=1e-4)  # only the last step's target moved


def test_few_step_loss_needs_the_trajectory_with_one_state_per_level():
    objective = KDObjective(LinearStudent(0.0, 0.0), (1.0, 0.5))
    b = batch(3)
    with pytest.raises(ValueError, match="teacher_trajectory and trajectory_sigmas"):
        objective.loss(b["noise"], b["teacher_output"], COND)
    with pytest.raises(ValueError, match="needs 1 trajectory states per pair, the batch holds 2"):
        objective.loss(b["noise"], b["teacher_output"], COND, b["teacher_trajectory"], b["trajectory_sigmas"])


def test_generate_is_the_few_step_sampler():
    student = ExactStudent()
    eps = torch.randn(SHAPE, generator=torch.Generator().manual_seed(4))
    one = KDObjective(student).generate(eps, COND)
    torch.testing.assert_close(one, torch.full_like(eps, MU))  # the posterior mean at sigma 1


def test_a_zero_loss_few_step_student_generates_the_teachers_output_with_its_euler_sampler():
    """KD's default sampler follows the chords its loss trains: a student with zero loss on
    the teacher's Euler path at its own levels generates exactly the teacher's output from the
    same noise; re-noising between the levels (DMD2's sampler) leaves that path."""
    levels = (1.0, 0.75, 0.5, 0.25)
    eps = torch.randn(SHAPE, generator=torch.Generator().manual_seed(6))
    sig = torch.tensor([[*levels, 0.0]] * 2)
    states = [eps]
    for k in range(4):
        r, r_next = sig[:, k].reshape(-1, 1, 1, 1, 1), sig[:, k + 1].reshape(-1, 1, 1, 1, 1)
        states.append(states[-1] + (r_next - r) * exact_velocity(states[-1], sig[:, k], MU, S))
    objective = KDObjective(ExactStudent(), levels)
    assert objective.sampler == "euler"
    assert objective.loss(eps, states[4], COND, torch.stack(states[1:4], dim=1), sig[:, 1:4]).item() < 1e-10
    torch.testing.assert_close(objective.generate(eps, COND), states[4])
    renoised = KDObjective(ExactStudent(), levels, "renoise").generate(eps, COND, torch.Generator().manual_seed(0))
    assert (renoised - states[4]).abs().max() > 0.05
