"""Driving DMD2Objective from outside: batched draws, the critic without a discriminator, the
generator at guidance 1 without an unconditional embedding, one phase per Phased DMD batch."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from distill_pl.methods.dmd2 import DMD2Draws, DMD2Objective
from distill_pl.models.conditioning import Conditioning
from distill_pl.util.randomness import step_generator

LEVELS = (1.0, 0.75, 0.5, 0.25)
SHAPE = (3, 1, 2, 2, 2)  # [B, C, T, H, W]
COND = Conditioning(torch.zeros(SHAPE[0], 1, 1), torch.ones(SHAPE[0], 1, dtype=torch.bool))


def generators(seed: int = 0) -> list[torch.Generator]:
    return [step_generator(seed, 4, stream=j) for j in range(SHAPE[0])]


def per_sample(obj: DMD2Objective, phase: int = 0) -> DMD2Draws:
    like = torch.zeros(())
    return DMD2Draws.cat([obj.draw(g, (1, *SHAPE[1:]), like, phase) for g in generators()])


@pytest.mark.parametrize("kwargs, phase", [({}, 0), ({"student_sigmas": LEVELS}, 0),
                                           ({"student_sigmas": LEVELS, "phased": True}, 2),
                                           ({"shift": 3.0}, 0)])
def test_draw_batch_equals_the_per_sample_draws_bit_for_bit(kwargs, phase):
    obj = DMD2Objective(nn.Identity(), nn.Identity(), nn.Identity(), nn.Identity(), feature_block=0, **kwargs)
    got = obj.draw_batch(generators(), SHAPE, torch.zeros(()), phase)
    want = per_sample(obj, phase)
    for name in ("eps", "sigma", "noise", "noise_real", "step", "renoise"):
        a, b = getattr(got, name), getattr(want, name)
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), name
    with pytest.raises(ValueError, match="one generator per sample"):
        obj.draw_batch(generators()[:2], SHAPE, torch.zeros(()), phase)


class Affine(nn.Module):
    """``v = w * x + sigma + mean text`` (one parameter); counts its calls and their batch sizes;
    ``feature_block`` also returns ``x`` as the features."""

    def __init__(self, w: float = 0.3):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(w))
        self.calls: list[tuple[int, bool]] = []  # (batch, with features)

    def forward(self, x, sigma, cond, feature_block=None):
        self.calls.append((x.shape[0], feature_block is not None))
        v = self.w * x + sigma.reshape(-1, 1, 1, 1, 1) + cond.text_embeds.mean(dim=(1, 2)).reshape(-1, 1, 1, 1, 1)
        return v if feature_block is None else (v, x)


class Raises(nn.Module):
    def forward(self, *args, **kwargs):
        raise AssertionError("the discriminator must not be called")


def loss_inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x_g = torch.randn(SHAPE, generator=g)
    sigma = torch.rand(SHAPE[0], generator=g) * 0.9 + 0.05
    return x_g, sigma, torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)


def test_generator_loss_at_guidance_one_needs_no_unconditional_embedding():
    teacher = Affine(0.5)
    obj = DMD2Objective(Affine(), teacher, Affine(0.2), Raises(), feature_block=0, guidance=1.0, gan_weight=0.0)
    x_g, sigma, noise, _, _ = loss_inputs()
    uncond = Conditioning(torch.full((SHAPE[0], 1, 1), 5.0), COND.text_mask)
    with_uncond, logs_u = obj.generator_loss(x_g, sigma, noise, COND, uncond)
    without, logs_n = obj.generator_loss(x_g, sigma, noise, COND, None)
    assert torch.equal(with_uncond, without)
    assert all(torch.equal(logs_u[k], logs_n[k]) for k in logs_u)
    assert teacher.calls == [(SHAPE[0], False)] * 2  # the conditional pass only
    guided = DMD2Objective(Affine(), teacher, Affine(0.2), Raises(), feature_block=0, guidance=3.0, gan_weight=0.0)
    with pytest.raises(ValueError, match="unconditional"):
        guided.generator_loss(x_g, sigma, noise, COND, None)


class MeanLogit(nn.Module):
    def forward(self, features):
        return features.flatten(1).mean(dim=1)


@pytest.mark.parametrize("discriminator_on", ["fake_score", "teacher"])
def test_critic_without_gan_weights_computes_no_features_and_the_same_fake_score_loss(discriminator_on):
    x_g, sigma, noise, noise_real, x_real = loss_inputs(1)
    teacher, fake_score = Affine(0.5), Affine(0.2)
    obj = DMD2Objective(Affine(), teacher, fake_score, Raises(), feature_block=0, gan_weight=0.0,
                        critic_gan_weight=0.0, discriminator_on=discriminator_on)
    loss, logs = obj.critic_loss(x_g, x_real, sigma, noise, noise_real, COND)
    assert teacher.calls == [] and fake_score.calls == [(SHAPE[0], False)]  # no features, fake only
    assert set(logs) == {"critic_loss", "fake_score_loss"} and loss is logs["fake_score_loss"]
    loss.backward()
    assert fake_score.w.grad is not None
    # the same fake-score loss as with the discriminator computed (and weighted 0)
    reference = DMD2Objective(Affine(), Affine(0.5), Affine(0.2), MeanLogit(), feature_block=0, gan_weight=1e-3,
                              critic_gan_weight=0.0, discriminator_on=discriminator_on)
    ref_loss, ref_logs = reference.critic_loss(x_g, x_real, sigma, noise, noise_real, COND)
    torch.testing.assert_close(logs["fake_score_loss"], ref_logs["fake_score_loss"], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-7)
    # a discriminator that is needed is still called
    with pytest.raises(AssertionError, match="must not be called"):
        DMD2Objective(Affine(), Affine(0.5), Affine(0.2), Raises(), feature_block=0, gan_weight=0.0,
                      critic_gan_weight=1.0).critic_loss(x_g, x_real, sigma, noise, noise_real, COND)


def test_phased_trained_step_refuses_a_batch_that_mixes_phases():
    student = Affine()
    obj = DMD2Objective(student, Raises(), Raises(), Raises(), feature_block=0, student_sigmas=LEVELS, phased=True)
    draws = obj.draw_batch(generators(), SHAPE, torch.zeros(()), phase=1)
    assert obj.trained_step(draws, COND).level is not None  # one phase: fine
    draws.step = torch.tensor([1, 2, 1])
    student.calls.clear()
    with pytest.raises(ValueError, match="one phase per batch") as error:
        obj.trained_step(draws, COND)
    assert "\n" not in str(error.value) and "[1, 2]" in str(error.value)
    assert student.calls == []  # refused before any forward
    # without Phased DMD a batch mixes steps freely
    mixed = DMD2Objective(Affine(), Raises(), Raises(), Raises(), feature_block=0, student_sigmas=LEVELS)
    mixed.trained_step(draws, COND)
