"""Decoupled DMD (an option of DMD2Objective) on the exact 2-D Gaussian-mixture teacher of
tests/methods/test_dmd2_mixture.py, with a CFG teacher whose unconditional branch is the same
mixture with a wider spread (so the CFG-augmentation term is not zero)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from distill_pl.methods.dmd2 import DMD2Objective
from tests.methods.test_dmd2_mixture import (
    MixtureTeacher,
    VelocityMLP,
    conditioning,
    flow_matching_init,
    train,
)

GUIDANCE = 2.0
UNCOND_STD = 0.6


def objective(levels: tuple[float, ...], phased: bool = False, **decoupled) -> DMD2Objective:
    torch.manual_seed(0)
    student, fake_score = VelocityMLP(), VelocityMLP()
    return DMD2Objective(
        student, MixtureTeacher(UNCOND_STD), fake_score, nn.Linear(student.head.in_features, 1), feature_block=0,
        guidance=GUIDANCE, gan_weight=0.1, student_sigmas=levels, phased=phased, **decoupled,
    )


def generator_gradient(obj: DMD2Objective, seed: int = 3, batch: int = 16):
    """(student gradient, logs) of one generator loss on draws from ``seed``."""
    generators = [torch.Generator().manual_seed(seed * 100 + j) for j in range(batch)]
    draws = obj.draw_batch(generators, (batch, 2), torch.zeros(()))
    cond, uncond = conditioning(batch, 1.0), conditioning(batch, 0.0)
    out = obj.trained_step(draws, cond)
    loss, logs = obj.generator_loss(out.sample, draws.sigma, draws.noise, cond, uncond, level=out.level, x0=out.x0,
                                    sigma_dm=draws.sigma_dm, noise_dm=draws.noise_dm, sigma_ca=draws.sigma_ca,
                                    noise_ca=draws.noise_ca)
    obj.student.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.clone() for n, p in obj.student.named_parameters()}, logs


@pytest.mark.parametrize("levels", [(1.0,), (1.0, 0.5)])
def test_equal_weights_on_the_shared_schedule_give_the_dmd_gradient(levels):
    """Weights 1, 1 and one schedule: the student's gradient (DMD + GAN term, one and two
    student steps) is the coupled objective's to float32 rounding (the teacher's clean
    estimates are combined after the velocity-to-x0 conversion), and the draws are the same."""
    coupled_grad, coupled_logs = generator_gradient(objective(levels))
    decoupled = objective(levels, decoupled=True)
    assert not decoupled.decoupled_schedule
    grad, logs = generator_gradient(decoupled)
    for name, g in coupled_grad.items():
        torch.testing.assert_close(grad[name], g, rtol=1e-5, atol=1e-7, msg=name)
    for key in ("dmd_loss", "dmd_normaliser", "dmd_grad_norm", "teacher_fake_x0_gap", "fake_score_loss_fresh"):
        torch.testing.assert_close(logs[key], coupled_logs[key], rtol=1e-5, atol=1e-7, msg=key)
    # the DM and CA terms add up to the DMD gradient: the CA norm is not 0 at guidance 2
    assert logs["dmd_dm_norm"] > 0 and logs["dmd_ca_norm"] > 0 and "dmd_dm_norm" not in coupled_logs


def test_own_schedule_draws_after_the_coupled_draws():
    """Own term ranges: each sample's coupled draws are unchanged, the terms' sigmas come from
    their ranges (shift 1: sigma = t), and the default draws have no term fields."""
    levels = (1.0, 0.5)
    generators = lambda: [torch.Generator().manual_seed(j) for j in range(64)]  # noqa: E731
    plain = objective(levels).draw_batch(generators(), (64, 2), torch.zeros(()))
    own = objective(levels, decoupled=True, ca_t_min=0.5, dm_t_max=0.4)
    assert own.decoupled_schedule and plain.sigma_dm is None and plain.noise_ca is None
    draws = own.draw_batch(generators(), (64, 2), torch.zeros(()))
    for name in ("eps", "sigma", "noise", "noise_real", "step", "renoise"):
        assert torch.equal(getattr(draws, name), getattr(plain, name)), name
    assert draws.sigma_dm.shape == draws.sigma_ca.shape == (64,) and draws.noise_dm.shape == (64, 2)
    assert 0.02 <= draws.sigma_dm.min() and draws.sigma_dm.max() <= 0.4
    assert 0.5 <= draws.sigma_ca.min() and draws.sigma_ca.max() <= 0.98
    assert torch.equal(draws.rows(slice(3, 5)).sigma_ca, draws.sigma_ca[3:5])


@pytest.mark.parametrize("phased", [False, True])
def test_two_step_student_with_own_schedule_and_weights(phased):
    """K = 2 (backward simulation, and Phased DMD), own ranges and weights: the loss has a
    finite gradient; a CA weight 0 removes the CA term (the DMD gradient norm is then the DM
    term's), a DM weight 0 the DM term."""
    settings = dict(decoupled=True, dm_t_min=0.3, ca_t_max=0.6)
    grad, logs = generator_gradient(objective((1.0, 0.5), phased, **settings))
    assert all(torch.isfinite(g).all() for g in grad.values()) and torch.isfinite(logs["generator_loss"])
    _, dm_only = generator_gradient(objective((1.0, 0.5), phased, ca_weight=0.0, **settings))
    _, ca_only = generator_gradient(objective((1.0, 0.5), phased, dm_weight=0.0, **settings))
    torch.testing.assert_close(dm_only["dmd_grad_norm"], logs["dmd_dm_norm"])
    torch.testing.assert_close(ca_only["dmd_grad_norm"], logs["dmd_ca_norm"])


def test_decoupled_settings_need_decoupled():
    with pytest.raises(ValueError, match="settings of Decoupled DMD"):
        objective((1.0,), ca_weight=0.5)
    with pytest.raises(ValueError, match="ca_t_min < ca_t_max"):
        objective((1.0,), decoupled=True, ca_t_min=0.99)


def test_decoupled_dmd_moves_a_student_to_the_cfg_mixture(one_thread):
    """One-step students trained by Decoupled DMD against the CFG mixture teacher (its
    unconditional branch wider, guidance 2: the CA term sharpens the modes; the CFG target
    keeps the data's four means): on the shared schedule, and with the CA term at high noise
    only and the DM term on the full range. Measured (seeded, 150 generator updates): see the
    printed line; the bounds leave a wide margin."""
    init = flow_matching_init()
    teacher = MixtureTeacher(UNCOND_STD)
    before, shared, _ = train(init, (1.0,), 150, batch=128, teacher=teacher, guidance=GUIDANCE, decoupled=True)
    _, own, _ = train(init, (1.0,), 150, batch=128, teacher=teacher, guidance=GUIDANCE, decoupled=True,
                   ca_t_min=0.5)
    print(f"energy distance to the data: {before:.4f} -> {shared:.4f} (shared schedule), {own:.4f} (CA t >= 0.5)")
    assert shared < 0.5 * before and own < 0.5 * before
