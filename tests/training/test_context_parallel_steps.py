"""Context parallel (Ulysses 2) x data parallel 2 on 4 gloo CPU processes == one process, for
the steps of KD and DMD2.

:func:`distill_pl.scale.context_parallel_check.run_check`: each of 4 processes builds the same
tiny Wan (T2V, then VACE) roles (random weights, gradient checkpointing on) and computes, without
any parallelism, a phase's loss on each of the 2 data-parallel batches and the gradients of
their mean (the reference); then its own batch's phase with the roles made context-parallel and
sharded exactly as a stage's ``configure_model`` does under ``FSDP2Strategy``
(``shard_stage_networks`` on a (data_parallel 2, ring 1, ulysses 2) mesh: ranks 0, 1 split
batch 0, ranks 2, 3 batch 1; every network sharded over all 4). Rank 0's loss equals its
batch's reference loss (rtol 1e-6) and each trained network's full (gathered) gradient the
reference gradient to a relative L2 error below 1e-5 (float32; the split changes only the order
of sums). Without the reduction's division by the data-parallel size alone the denoisers' error
would be 0.5.

The same for Cosmos-Transfer2.5 (base + ControlNet, each with its plan; conditional frames in
sample 0, so the per-frame timesteps and condition masks differ within a video), and for
Cosmos-Predict2.5 (the base plan alone) on one group of Ulysses 2 without sharding: the hooks
alone, each denoiser's gradient summed over the group by hand.

Ring attention is not run here: diffusers' CPU attention does not return the log-sum-exp that
ring attention merges with (``scripts/check_context_parallel.py`` runs it on a GPU, in the GPU
report). Slow: deselected by default.
"""

from __future__ import annotations

import pytest
import torch

from distill_pl.models.context_parallel import ContextParallel
from distill_pl.scale.context_parallel_check import run_check
from tests.families.cosmos_tiny import PREDICT_TRANSFORMER, TEXT_DIM, script

pytestmark = pytest.mark.slow

#: 3 latent + 3 control channels, 2 heads x 8, patches (1, 2, 2), 3 blocks
TINY = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=6, out_channels=3,
            text_dim=16, freq_dim=16, ffn_dim=32, num_layers=3)
#: the same with a VACE branch instead of the concatenated control: hints after blocks 0 and 2
#: from a 6-channel context
VACE = {**TINY, "in_channels": 3, "vace_layers": [0, 2], "vace_in_channels": 6}


def test_ulysses_times_data_parallel_gives_the_losses_and_gradients_of_one_process(tmp_path):
    """KD step, DMD2 critic step (fake score + discriminator head on the gathered features of
    block 1) and DMD2 generator step (teacher with CFG and fake score without gradient, the GAN
    term through the fake score's features), for Wan T2V (diffusers' plan) and Wan VACE
    (``VACE_CP_PLAN``); latents [2, 3, 2, 8, 8]: 32 tokens per video, 16 per rank."""
    common = dict(cp=ContextParallel(ulysses=2), data_parallel=2, shape=(2, 3, 2, 8, 8),
                  text=(5, TINY["text_dim"]), device=torch.device("cpu"))
    rows = run_check(tmp_path / "rows.json", [dict(class_name="WanTransformer3DModel", config=TINY, **common),
                                              dict(class_name="WanVACETransformer3DModel", config=VACE, **common)])
    check_rows(rows, ["WanTransformer3DModel", "WanVACETransformer3DModel"])


def test_cosmos_transfer_under_ulysses_times_data_parallel_gives_the_losses_and_gradients_of_one_process(
        tmp_path):
    """As above for the tiny Cosmos-Transfer2.5 (16 latent and control channels, 2 heads x 16,
    2 base and 2 ControlNet blocks), latents [2, 16, 2, 8, 8]: 32 tokens per video."""
    config = {"transformer": script.TRANSFORMER, "controlnet": script.CONTROLNET}
    rows = run_check(tmp_path / "rows.json", [dict(
        class_name="CosmosTransformer3DModel", config=config, cp=ContextParallel(ulysses=2), data_parallel=2,
        shape=(2, 16, 2, 8, 8), text=(5, TEXT_DIM), device=torch.device("cpu"))])
    check_rows(rows, ["CosmosTransformer3DModel"])


def test_cosmos_predict_under_ulysses_gives_the_losses_and_gradients_of_one_process(tmp_path):
    """The tiny Cosmos-Predict2.5 on one unsharded group of 2 (the hooks alone)."""
    rows = run_check(tmp_path / "rows.json", [dict(
        class_name="Cosmos2_5_PredictBasePipeline", config=PREDICT_TRANSFORMER, cp=ContextParallel(ulysses=2),
        sharding="none", shape=(2, 16, 2, 8, 8), text=(5, TEXT_DIM), device=torch.device("cpu"))])
    check_rows(rows, ["Cosmos2_5_PredictBasePipeline"])


def test_wan22_experts_under_ulysses_give_the_losses_and_gradients_of_one_process(tmp_path):
    """Two tiny Wan experts as one denoiser (boundary 0.5: of each batch's levels 0.3 and 0.8,
    one sample runs on each expert) on one unsharded group of 2 (the hooks alone): each expert
    split with Wan's plan, the block features gathered by the expert that ran them."""
    config = {"transformer": TINY, "transformer_2": TINY, "boundary_ratio": 0.5}
    rows = run_check(tmp_path / "rows.json", [dict(
        class_name="WanTransformer3DModel", config=config, cp=ContextParallel(ulysses=2), sharding="none",
        shape=(2, 3, 2, 8, 8), text=(5, TINY["text_dim"]), device=torch.device("cpu"))])
    check_rows(rows, ["WanTransformer3DModel"])


def check_rows(rows: list[dict], class_names: list[str]) -> None:
    """Rows of every phase of each class in order; split loss == reference loss (rel 1e-6), each
    trained network's gradient within 1e-5 relative L2 error of the reference."""
    phases = ["KD step", "critic", "generator"]
    assert [(r["class_name"], r["phase"]) for r in rows] == [(name, phase) for name in class_names for phase in phases]
    expected = {"KD step": ["student"], "critic": ["fake_score", "discriminator"], "generator": ["student"]}
    for row in rows:
        assert row["loss_split"] == pytest.approx(row["loss_reference"], rel=1e-6), row
        assert sorted(row["gradient_relative_error"]) == sorted(expected[row["phase"]])
        for name, error in row["gradient_relative_error"].items():
            assert error < 1e-5, (row["class_name"], row["phase"], name, error)
