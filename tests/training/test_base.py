"""The one training loop (distill_pl/training/base.py) as KD and teacher training run it:
micro-batches, clipping, the Trainer settings it refuses; one training_step in the package."""

from __future__ import annotations

import re
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from distill_pl.families.wan.adapter import WanDenoiser
from distill_pl.training.kd import KDModule
from distill_pl.training.teacher import TeacherTrainingModule
from tests.training.test_kd import StubPairs, pairs_batch, teacher_dir  # noqa: F401 (fixture)
from tests.training.test_nonfinite import TINY, clip_batch

REPO = Path(__file__).resolve().parents[2]


def fit(module, data, steps: int = 2, **trainer_args) -> None:
    trainer = L.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, limit_val_batches=0,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        **trainer_args)
    trainer.fit(module, data) if isinstance(data, DataLoader) else trainer.fit(module, datamodule=data)


def test_exactly_one_training_step_in_the_package():
    found = [f"{path.relative_to(REPO)}:{n}" for path in sorted((REPO / "distill_pl").rglob("*.py"))
             for n, line in enumerate(path.read_text().splitlines(), 1) if re.search(r"def training_step\b", line)]
    assert found == [f"distill_pl/training/base.py:{found[0].rsplit(':', 1)[1]}"] and len(found) == 1


@pytest.mark.parametrize("setting, message", [
    (dict(accumulate_grad_batches=2), r"trainer.accumulate_grad_batches=2: KDModule .*model.accumulate_micro_batches"),
    (dict(gradient_clip_val=10), r"trainer.gradient_clip_val=10: KDModule .*model.grad_clip"),
])
def test_the_trainers_accumulation_and_clipping_are_refused_with_the_new_setting(teacher_dir, setting, message):
    kd = KDModule(teacher_dir)
    with pytest.raises(ValueError, match=message) as error:
        fit(kd, StubPairs(teacher_dir, [pairs_batch()]), **setting)
    assert "\n" not in str(error.value)


def test_kd_micro_batches_give_the_full_batch_update(teacher_dir):
    """4 samples in 1 or 3 micro-batches (sizes 1, 1, 2): the same weights and EMA after 2
    clipped steps (the clip is active: a low max norm)."""
    batches = [pairs_batch(n=4, seed=i) for i in range(2)]
    runs = []
    for micro in (1, 3):
        torch.manual_seed(0)
        kd = KDModule(teacher_dir, lr=1e-3, ema_decay=0.5, grad_clip=0.01, accumulate_micro_batches=micro)
        fit(kd, StubPairs(teacher_dir, batches))
        assert kd.step_metrics["train/grad_norm_student"] > 0.01  # clipped
        runs.append(kd)
    for name in ("student", "student_ema"):
        one, several = (dict(getattr(k, name).named_parameters()) for k in runs)
        for key in one:
            torch.testing.assert_close(several[key], one[key], rtol=1e-5, atol=1e-6)
    assert not torch.equal(runs[0].student.transformer.proj_out.weight, runs[0].teacher.transformer.proj_out.weight)


def test_teacher_micro_batches_give_the_full_batch_update_and_the_warmup_steps(tmp_path):
    """Teacher training: the step's draws are made for the whole batch, so 2 micro-batches
    give the update of one; the warm-up scheduler steps once per optimizer step."""
    batches = []
    for i in range(3):
        a, b = clip_batch(2 * i), clip_batch(2 * i + 1)
        batches.append({k: torch.cat([a[k], b[k]]) for k in a})
    runs = []
    for micro in (1, 2):
        torch.manual_seed(0)
        module = TeacherTrainingModule(WanDenoiser(config=TINY), warmup_steps=8, text_dropout=0.5,
                                       grad_clip=1.0, accumulate_micro_batches=micro)
        module.set_negative_prompt(torch.zeros(1, 4, 8), torch.zeros(1, 4, dtype=torch.bool))
        fit(module, DataLoader(batches, batch_size=None), steps=3, default_root_dir=tmp_path)
        [optimizer] = module.trainer.optimizers
        assert optimizer.param_groups[0]["lr"] == pytest.approx(module.hparams.lr * 4 / 8)  # 3 steps into the warm-up
        runs.append(module)
    one, several = (dict(m.denoiser.named_parameters()) for m in runs)
    for key in one:
        torch.testing.assert_close(several[key], one[key], rtol=1e-5, atol=1e-6)


def test_a_training_batch_reaches_the_device_one_micro_batch_at_a_time(teacher_dir, monkeypatch):
    """The loaded batch stays in host memory (Lightning's transfer leaves it alone during
    training); the step moves each micro-batch (and its draws) when it runs it. Validation
    batches still move whole."""
    import distill_pl.training.base as base

    moved: list[int] = []

    def recording_move(data, device):
        if isinstance(data, dict):
            moved.append(len(data["text_embeds"]))
        return base_move(data, device)

    base_move = base.move_data_to_device
    monkeypatch.setattr(base, "move_data_to_device", recording_move)
    kd = KDModule(teacher_dir, lr=1e-3, accumulate_micro_batches=3)
    fit(kd, StubPairs(teacher_dir, [pairs_batch(n=4, seed=i) for i in range(2)]))
    assert moved == [1, 1, 2, 1, 1, 2]  # 2 steps of 3 micro-batches, never the batch of 4
    batch = pairs_batch(n=4, seed=0)
    kd.trainer.state.stage = "train"
    assert kd.transfer_batch_to_device(batch, torch.device("cpu"), 0) is batch
    kd.trainer.state.stage = "validate"  # outside the training loop the whole batch moves
    assert kd.transfer_batch_to_device(batch, torch.device("cpu"), 0) is not batch


def test_compile_compiles_the_stages_trained_blocks_at_fit_start(teacher_dir):
    """``compile: true`` compiles each block of the stage's networks (lazily: nothing runs
    here); off by default. The numbers are the eager ones: tests/families/test_conformance.py
    (slow set) compares a compiled network with its eager copy."""
    for setting in (False, True):
        kd = KDModule(teacher_dir, ema_decay=0.5, compile=setting)
        kd.on_fit_start()
        compiled = [unit._compiled_call_impl is not None for unit in kd.student.fsdp_units]
        assert compiled == [setting] * len(kd.student.fsdp_units) and compiled
        assert all(unit._compiled_call_impl is None for unit in kd.teacher.fsdp_units)  # KD's steps do not run it
    kd.student.eager_blocks()  # the inverse, which the benchmark uses between its phases
    assert all(unit._compiled_call_impl is None for unit in kd.student.fsdp_units)
