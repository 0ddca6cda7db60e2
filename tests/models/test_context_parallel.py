"""The context_parallel setting and its checks (one process; the split passes themselves run
over 2 gloo processes in tests/training/test_context_parallel_steps.py and
tests/training/test_dmd2_context_parallel.py, slow)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from distill_pl.families.cosmos_transfer.configs import COSMOS_TRANSFER_2_5_2B, TRANSFORMER_CLASS
from distill_pl.families.registry import build_denoiser
from distill_pl.families.wan.adapter import WanDenoiser
from distill_pl.families.wan.experts import WanExpertsDenoiser
from distill_pl.families.wan.vace import VACE_CP_PLAN, WanVACEDenoiser
from distill_pl.models.conditioning import Conditioning
from distill_pl.models.context_parallel import ContextParallel, enable_context_parallel, stage_context_parallel
from distill_pl.models.denoiser import Denoiser
from distill_pl.models.sharding import shard_stage_networks

#: 2 heads x 8, patches (1, 2, 2)
WAN = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=3, out_channels=3,
           text_dim=16, freq_dim=16, ffn_dim=32, num_layers=1)


@pytest.fixture(scope="module")
def wan():
    torch.manual_seed(0)
    return WanDenoiser(config=WAN)


@pytest.mark.parametrize("setting", [None, {}, {"ulysses": 1, "ring": 1}])
def test_an_empty_or_size_one_setting_is_off(setting):
    assert ContextParallel.from_setting(setting) is None


def test_setting_sizes():
    assert ContextParallel.from_setting({"ulysses": 2}) == ContextParallel(ulysses=2, ring=1)
    assert ContextParallel.from_setting({"ulysses": 2, "ring": 4}).size == 8


@pytest.mark.parametrize("setting, message", [
    ({"ulyses": 2}, r"context_parallel must be a mapping with keys \['ulysses', 'ring'\], got \{'ulyses': 2\}"),
    ({"ulysses": 0}, "context_parallel.ulysses must be an integer >= 1, got 0"),
    ({"ring": "2"}, "context_parallel.ring must be an integer >= 1, got '2'"),
    ({"ulysses": True}, "context_parallel.ulysses must be an integer >= 1, got True"),
])
def test_bad_settings_are_one_line_errors(setting, message):
    with pytest.raises(ValueError, match=message):
        ContextParallel.from_setting(setting)


def test_the_stage_checks_the_plan_and_the_head_count(wan):
    assert stage_context_parallel({"ulysses": 2}, wan) == ContextParallel(ulysses=2)
    assert list(wan.context_parallel_plans) == ["transformer"]
    with pytest.raises(ValueError, match="context_parallel.ulysses=4 must divide the 2 attention heads of WanDenoiser"):
        stage_context_parallel({"ulysses": 4}, wan)
    vace = WanVACEDenoiser(config={**WAN, "vace_layers": [0], "vace_in_channels": 6})
    assert vace.context_parallel_plans == {"transformer": VACE_CP_PLAN}
    assert stage_context_parallel({"ulysses": 2}, vace) == ContextParallel(ulysses=2)


class Planless(Denoiser):
    """A denoiser whose family declares no context-parallel plan (the contract's default)."""


def test_a_family_without_a_plan_is_refused():
    with pytest.raises(ValueError, match="context_parallel: Planless declares no context-parallel plan"):
        stage_context_parallel({"ulysses": 2}, Planless())


def test_two_experts_take_each_experts_plan_and_share_the_group():
    """Wan 2.2's two experts (tiny, as one denoiser): Wan's plan under each expert's path, the
    heads of both checked, the group set on both experts (each checks and gathers over it)."""
    experts = WanExpertsDenoiser(config={"transformer": WAN, "transformer_2": WAN, "boundary_ratio": 0.875})
    plan = type(experts.high_noise.transformer)._cp_plan
    assert experts.context_parallel_plans == {"high_noise.transformer": plan, "low_noise.transformer": plan}
    assert stage_context_parallel({"ulysses": 2}, experts) == ContextParallel(ulysses=2)
    with pytest.raises(ValueError, match="ulysses=4 must divide the 2 attention heads of WanExpertsDenoiser"):
        stage_context_parallel({"ulysses": 4}, experts)
    group = SimpleNamespace(size=lambda: 3)
    experts.context_parallel_group = group
    assert experts.high_noise.context_parallel_group is group and experts.low_noise.context_parallel_group is group
    with pytest.raises(ValueError, match="32 tokens per video cannot be split over the 3 context-parallel"):
        experts(torch.zeros(1, 3, 2, 8, 8), torch.tensor([0.5]),
                Conditioning(torch.zeros(1, 4, 16), torch.ones(1, 4, dtype=torch.bool)))


def test_the_published_cosmos_transfer_plans_take_ulysses_dividing_its_heads():
    """Cosmos-Transfer2.5-2B (published config, on the meta device): 16 heads in the base and in
    the ControlNet."""
    cosmos = build_denoiser(TRANSFORMER_CLASS, COSMOS_TRANSFER_2_5_2B, on_meta=True)
    assert list(cosmos.context_parallel_plans) == ["transformer", "controlnet"]
    assert stage_context_parallel({"ulysses": 8}, cosmos) == ContextParallel(ulysses=8)
    with pytest.raises(ValueError, match="context_parallel.ulysses=3 must divide the 16 attention heads of "
                                         "CosmosTransferDenoiser"):
        stage_context_parallel({"ulysses": 3}, cosmos)


def test_ring_needs_cuda(wan):
    with pytest.raises(ValueError, match=r"context_parallel.ring=2 needs CUDA .*; use ulysses"):
        enable_context_parallel(wan, ContextParallel(ring=2), mesh=None, device=torch.device("cpu"))


def test_context_parallel_needs_the_fsdp2_strategy(wan):
    stage = SimpleNamespace(context_parallel=ContextParallel(ulysses=2), device_mesh=None)
    with pytest.raises(ValueError, match="context_parallel needs --trainer.strategy distill_pl.training.strategies.FSDP2Strategy"):
        shard_stage_networks(stage, [wan])


def test_a_token_count_the_group_does_not_divide_is_refused(wan):
    """3 x 2 x 3 = 18 tokens split over a group of 4."""
    x_t = torch.zeros(1, 3, 3, 4, 6)
    cond = Conditioning(torch.zeros(1, 5, WAN["text_dim"]))
    wan.check_inputs(x_t, torch.ones(1), cond)
    wan.context_parallel_group = SimpleNamespace(size=lambda: 4)
    try:
        with pytest.raises(ValueError, match="18 tokens per video cannot be split over the 4 context-parallel processes"):
            wan.check_inputs(x_t, torch.ones(1), cond)
    finally:
        del wan.context_parallel_group


@pytest.mark.parametrize("devices, options, message", [
    (3, {}, r"context_parallel ulysses=2 x ring=1 needs a multiple of 2 processes \(got 3\)"),
    (2, {"data_parallel_size": 2}, "data_parallel_size=2: with context_parallel of 2 processes on 2 it is 1"),
])
def test_the_strategy_refuses_a_process_count_the_group_does_not_divide(devices, options, message):
    """Checked before any process group exists."""
    from distill_pl.training.strategies import FSDP2Strategy

    strategy = FSDP2Strategy(**options)
    strategy.parallel_devices = [torch.device("cpu")] * devices
    with pytest.raises(ValueError, match=message):
        strategy._setup_context_parallel_environment(ContextParallel(ulysses=2))
