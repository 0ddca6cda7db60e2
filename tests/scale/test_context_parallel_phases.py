"""The context-parallel check's phases in one process (default suite; the multi-process check is
the slow ``tests/training/test_context_parallel_steps.py``): the roles it builds carry every
setting the stages' roles read, since its settings are the stage modules' own defaults."""

from __future__ import annotations

import inspect

import pytest
import torch

from distill_pl.scale.context_parallel_check import PHASES, build_roles, phase_loss, stage_settings
from distill_pl.training.dmd2 import DMD2Module

#: 3 latent channels, 2 heads x 8, patches (1, 2, 2), 3 blocks
TINY = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=3, out_channels=3,
            text_dim=16, freq_dim=16, ffn_dim=32, num_layers=3)


def test_check_settings_are_the_stage_defaults_with_the_overrides():
    settings = stage_settings("dmd2")
    defaults = {p.name for p in inspect.signature(DMD2Module.__init__).parameters.values()
                if p.default is not inspect.Parameter.empty}
    assert defaults <= set(settings)
    assert settings["student_lora_rank"] is None and settings["feature_block"] == 1
    assert settings["gan_weight"] == 0.5 and stage_settings("kd")["ema_decay"] is None


@pytest.mark.parametrize(("method", "phase"), PHASES)
def test_every_phase_gives_a_finite_loss_and_gradients_of_the_trained_networks(method, phase):
    roles, settings = build_roles(method, "WanTransformer3DModel", TINY, None)
    loss = phase_loss(roles, settings, phase, (2, 3, 2, 8, 8), (5, TINY["text_dim"]), 0, torch.device("cpu"))
    loss.backward()
    assert torch.isfinite(loss)
    for name in roles.phases[phase]:
        grads = [p.grad for p in getattr(roles, name).parameters() if p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads), name
