"""The non-finite policy shared by the training stages, and teacher training under it."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from distill_pl.families.wan.adapter import WanDenoiser
from distill_pl.models.finite_weights import NonFiniteWeightsError, check_finite
from distill_pl.training.nonfinite import NonFinitePolicy, NonFiniteTrainingError
from distill_pl.training.teacher import TeacherTrainingModule

TINY = dict(
    patch_size=[1, 4, 4], num_attention_heads=2, attention_head_dim=8, in_channels=6,
    out_channels=3, text_dim=8, freq_dim=16, ffn_dim=16, num_layers=1, rope_max_seq_len=32,
)


def test_policy_counts_streaks_and_stops_at_the_limit():
    policy = NonFinitePolicy("KD", max_consecutive=2)
    with pytest.warns(UserWarning, match=r"KD step 3 \(critic phase\): non-finite .* \(1 in a row, 1 in total\)"):
        policy.record(False, 3, "critic phase")
    policy.record(True, 4)
    assert (policy.total, policy.streak) == (1, 0)
    with pytest.warns(UserWarning):
        policy.record(False, 5)
    with pytest.raises(NonFiniteTrainingError, match="KD stopped at step 6: 2 consecutive .* 3 in total"):
        policy.record(False, 6)
    restored = NonFinitePolicy("KD", 2)
    restored.load_state_dict(policy.state_dict())
    assert (restored.total, restored.streak) == (3, 2)
    with pytest.raises(ValueError, match="max_nonfinite_steps must be >= 1"):
        NonFinitePolicy("KD", 0)


def test_policy_counts_each_expert_and_stops_on_one_experts_streak():
    """An expert's skips count whether alone (the step applied) or with the whole update; its
    streak runs over the updates of its phase and stops the run at the limit; the counters
    round-trip through the state dict (and a state without them loads as zeros)."""
    policy = NonFinitePolicy("DMD2", max_consecutive=3)
    with pytest.warns(UserWarning, match=r"DMD2 step 0: non-finite gradient in student.high_noise only, "
                                         r"its update skipped, the rest applied \(student.high_noise: 1 in a row"):
        policy.record(True, 0, experts={"student.high_noise": False, "student.low_noise": True})
    policy.record(True, 1, experts={"fake_score.high_noise": True})  # another phase: no student streak change
    with pytest.warns(UserWarning, match="DMD2 step 2: non-finite loss or gradient, update skipped"):
        policy.record(False, 2, experts={"student.high_noise": False, "student.low_noise": False})
    assert (policy.total, policy.streak) == (1, 1)
    assert policy.expert_total == {"student.high_noise": 2, "student.low_noise": 1, "fake_score.high_noise": 0}
    restored = NonFinitePolicy("DMD2", 3)
    restored.load_state_dict(policy.state_dict())
    assert (restored.expert_total, restored.expert_streak) == (policy.expert_total, policy.expert_streak)
    with pytest.raises(NonFiniteTrainingError, match="DMD2 stopped at step 4: 3 consecutive updates of "
                                                     "student.high_noise were skipped"):
        restored.record(True, 4, experts={"student.high_noise": False, "student.low_noise": True})
    assert "nonfinite_experts" not in NonFinitePolicy("KD", 2).state_dict()
    empty = NonFinitePolicy("KD", 2)
    empty.load_state_dict({"nonfinite_total": 1, "nonfinite_streak": 0})
    assert empty.expert_total == {}


def test_check_finite_names_the_tensor():
    check_finite({"a": torch.ones(2), "steps": torch.tensor([3])}, "x")
    with pytest.raises(NonFiniteWeightsError, match="refusing to write a file: 1 tensor.*'b'"):
        check_finite({"a": torch.ones(2), "b": torch.tensor([1.0, math.inf])}, "a file")


def clip_batch(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    shape = (2, 3, 2, 8, 8)
    return {
        "video": torch.rand(shape, generator=g) * 2 - 1,
        "control": torch.randint(0, 2, shape, generator=g).float() * 2 - 1,
        "text_embeds": torch.randn(2, 4, 8, generator=g),
        "text_mask": torch.ones(2, 4, dtype=torch.bool),
    }


def test_teacher_training_skips_non_finite_steps_and_stops_after_the_limit(tmp_path):
    torch.manual_seed(0)
    module = TeacherTrainingModule(WanDenoiser(config=TINY), warmup_steps=1, max_nonfinite_steps=2)
    module.set_negative_prompt(torch.zeros(1, 4, 8), torch.zeros(1, 4, dtype=torch.bool))
    batches = [clip_batch(i) for i in range(6)]
    batches[1]["video"][0, 0, 0, 0, 0] = math.nan  # step 1: NaN loss
    for b in batches[3:]:
        b["video"][:] = math.nan  # steps 3, 4: two in a row
    weights = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            weights.append(pl_module.denoiser.transformer.proj_out.weight.detach().clone())

    trainer = L.Trainer(max_steps=6, logger=False, enable_checkpointing=False, limit_val_batches=0,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                        callbacks=[Record()])
    with pytest.warns(UserWarning, match="teacher training step 1: non-finite"):
        with pytest.raises(NonFiniteTrainingError, match="teacher training stopped at step 4: 2 consecutive"):
            trainer.fit(module, DataLoader(batches, batch_size=None))
    w0, w1, w2, w3 = weights  # after steps 0..3
    assert torch.equal(w0, w1) and not torch.equal(w1, w2) and torch.equal(w2, w3)
    assert all(torch.isfinite(p).all() for p in module.parameters())
    assert (module.nonfinite.total, module.nonfinite.streak) == (3, 2)
