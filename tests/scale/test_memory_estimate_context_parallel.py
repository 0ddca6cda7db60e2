"""``estimate-memory`` with a stage's ``context_parallel``: closed forms on the tiny Wan model
(4 heads, 512 tokens per video), and the one-line errors."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from distill_pl.models.context_parallel import ContextParallel
from distill_pl.scale.memory_estimate import estimate_memory
from distill_pl.scale.sequence_split import exchange_buffer_bytes

REPO = Path(__file__).resolve().parents[2]
TINY = {"kd": ("configs/tiny/kd.yaml", "KD step"), "dmd2": ("configs/tiny/dmd2.yaml", "critic")}


@pytest.fixture(autouse=True)
def at_repo(monkeypatch, one_thread):
    """The tiny configs name ``teachers/tiny`` relative to the repository."""
    monkeypatch.chdir(REPO)


def with_cp(config: str, folder: Path, **setting) -> str:
    """``config`` with ``model.init_args.context_parallel: setting``, written to ``folder``."""
    parsed = yaml.safe_load(Path(config).read_text())
    parsed["model"]["init_args"]["context_parallel"] = setting or None
    path = folder / f"cp_{'_'.join(f'{k}{v}' for k, v in setting.items()) or 'off'}_{Path(config).name}"
    path.write_text(yaml.safe_dump(parsed))
    return str(path)


@pytest.mark.parametrize("method", ["kd", pytest.param("dmd2", marks=pytest.mark.slow)])  # dmd2: 4 estimates, ~40 s
def test_token_proportional_activations_scale_as_one_over_the_group_size(method, tmp_path):
    """Activations per rank are A(P) = T / P + R (+ F for P > 1): the parts after the split
    (every block's tensors, the rotary tables) divide by P = ulysses x ring; the rest R (the
    gathered output, the losses on full latents, text, timestep embeddings) does not; F is the
    all-gathered block features the DMD2 critic's discriminator reads, a new full-size tensor
    that one process does not need (its block output is already saved): critic micro-batch 2
    x (student sample + real clip) x 512 tokens x 128 wide x float32. So with P = 2, 4 (and 8):
    A(P) - A(2P) halves with each doubling, exactly, and A(1) - A(2) = T / 2 - F. Ring splits as
    Ulysses does. Every other row is the plain FSDP2 estimate on the same devices."""
    config, phase = TINY[method]
    settings = {1: {}, 2: {"ulysses": 2}, 4: {"ulysses": 2, "ring": 2}}
    if method == "dmd2":
        settings[8] = {"ulysses": 2, "ring": 4}
    kwargs = dict(devices=8, sharding="fsdp", micro_batch=2)
    estimates = {p: estimate_memory(with_cp(config, tmp_path, **setting), **kwargs) for p, setting in settings.items()}
    a = {p: e.phases[phase].activations for p, e in estimates.items()}
    split = 4 * (a[2] - a[4])  # T
    features = 2 * 2 * 512 * 128 * 4 if method == "dmd2" else 0
    assert a[1] - a[2] == split // 2 - features
    if method == "dmd2":
        assert a[4] - a[8] == split // 8
    rest = a[1] - split
    assert split > 10 * rest > 0  # the blocks dominate, and something stays full size
    for estimate in estimates.values():
        assert estimate.static == estimates[1].static
        assert estimate.phases[phase].gradients == estimates[1].phases[phase].gradients
    assert estimates[1].phases[phase].exchange_buffers == 0
    assert "context parallel: ulysses 2 x ring 1 = 2 processes per pass (256 tokens each); " \
           "4 data-parallel group(s)" in estimates[2].header[2]


def test_exchange_buffers_are_the_rank_query_times_the_closed_forms(tmp_path):
    """The largest query of the tiny KD step under Ulysses 2: micro-batch 2 x 256 tokens x 128
    (4 heads x 32) float32 values, six buffers of it; ring adds its gathered keys and values."""
    estimate = estimate_memory(with_cp(TINY["kd"][0], tmp_path, ulysses=2), devices=2, sharding="fsdp",
                               micro_batch=2)
    query = 2 * 256 * 128
    assert estimate.phases["KD step"].exchange_buffers == 6 * 4 * query
    both = ContextParallel(ulysses=2, ring=2)
    assert exchange_buffer_bytes(both, query, 2) == 6 * 2 * query + 2 * 3 * 2 * query + 8 * query
    assert "| context-parallel exchange buffers (one attention call) |" in estimate.table()


@pytest.mark.parametrize(("setting", "kwargs", "message"), [
    ({"ulysses": 4}, dict(devices=6, sharding="fsdp"), "ulysses=4 x ring=1 needs a multiple of 4 devices, got 6"),
    ({"ulysses": 2}, dict(devices=2, sharding="none"), "context_parallel runs under FSDP2 only: pass --sharding fsdp (got none)"),
    ({"ulysses": 3}, dict(devices=3, sharding="fsdp"), "ulysses=3 must divide the 4 attention heads"),
    ({"ulysses": 0}, dict(devices=2, sharding="fsdp"), "context_parallel.ulysses must be an integer >= 1"),
])
def test_bad_context_parallel_settings_are_one_line_errors(setting, kwargs, message, tmp_path):
    with pytest.raises(ValueError, match=re.escape(message)) as error:
        estimate_memory(with_cp(TINY["kd"][0], tmp_path, **setting), **kwargs)
    assert "\n" not in str(error.value)
