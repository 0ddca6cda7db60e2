"""DMD2Module builds its DMD2Objective once, over its own networks, outside its state dict."""

from __future__ import annotations

import pytest
import torch

from distill_pl.export.model_folders import save_teacher_folder
from distill_pl.families.registry import build_denoiser
from distill_pl.methods.dmd2 import DMD2Objective
from distill_pl.models.discriminator import DiscriminatorHead
from distill_pl.training.dmd2 import DMD2Module

TINY_WAN = dict(
    patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=6,
    out_channels=3, text_dim=384, freq_dim=16, ffn_dim=32, num_layers=2,
)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("teacher")
    save_teacher_folder(folder, build_denoiser("WanTransformer3DModel", TINY_WAN), "unipc", shift=2.0)
    return folder


def test_the_objective_is_built_once_over_the_modules_networks(teacher_dir):
    module = DMD2Module(str(teacher_dir), guidance=3.0, gan_weight=0.0, student_sigmas=[1.0, 0.5])
    obj = module.objective
    assert isinstance(obj, DMD2Objective) and module.objective is obj
    for name in ("student", "teacher", "fake_score", "discriminator"):
        assert getattr(obj, name) is getattr(module, name)
    assert (obj.guidance, obj.gan_weight, obj.shift, obj.student_sigmas) == (3.0, 0.0, 2.0, module.student_levels)
    assert obj.feature_block == module.feature_block
    # not a submodule: the state dict holds each network once, under its own name
    keys = module.state_dict().keys()
    assert not any(k.startswith("objective") for k in keys)
    assert {k.split(".")[0] for k in keys} <= {"student", "teacher", "fake_score", "discriminator", "autoencoder",
                                               "negative_prompt", "student_ema"}
    fresh = DMD2Module(str(teacher_dir), guidance=3.0, gan_weight=0.0, student_sigmas=[1.0, 0.5])
    fresh.load_state_dict(module.state_dict(), strict=True)
    # re-assigned networks and settings re-point the same objective
    head = DiscriminatorHead(module.teacher.feature_dim, 4)
    module.discriminator = head
    module.feature_block, module.shift = 0, 1.0
    assert module.objective is obj and obj.discriminator is head
    assert (obj.feature_block, obj.shift) == (0, 1.0)
    assert any(k.startswith("discriminator.") for k in module.state_dict())


def test_guidance_one_needs_no_negative_prompt(teacher_dir):
    from distill_pl.models.conditioning import Conditioning

    cond = Conditioning(torch.zeros(2, 3, 384), torch.ones(2, 3, dtype=torch.bool))
    assert DMD2Module(str(teacher_dir), guidance=1.0).guidance_uncond(cond) is None
    with pytest.raises(RuntimeError, match="negative-prompt"):  # none set: w != 1 needs one
        DMD2Module(str(teacher_dir), guidance=3.0).guidance_uncond(cond)
