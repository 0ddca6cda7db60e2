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
