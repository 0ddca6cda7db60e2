"""DMD2 gradient accumulation: N micro-batches make the optimizer step of one N-times batch."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from distill_pl.training.dmd2 import DMD2Module
from tests.training.test_dmd2 import FAST, poison_fake_score, teacher_dir, tensors, trainer  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/training/conftest.py
NETWORKS = ("student", "fake_score", "discriminator")


def clip_batch(size: int = 4, seed: int = 0) -> dict:
    """A clips-mode batch (4 frames of 16x16, 8 tokens of the MiniLM width 384)."""
    g = torch.Generator().manual_seed(seed)
    video = (3, 4, 16, 16)
    mask = torch.arange(8).expand(size, 8) < torch.arange(5, 5 + size)[:, None]
    return {
        "video": torch.rand(size, *video, generator=g) * 2 - 1,
        "control": torch.randint(0, 2, (size, *video), generator=g).float() * 2 - 1,
        "caption": [f"clip {i}" for i in range(size)],
        "text_embeds": torch.randn(size, 8, 384, generator=g) * mask[..., None],
        "text_mask": mask,
    }


class StepSnapshots(L.Callback):
    """Per step: the gradients the optimizer applies (accumulated, clipped), the weights after
    the step, and the step's metrics."""

    def __init__(self):
        self.grads: list[dict[str, torch.Tensor]] = []
        self.weights: list[dict[str, torch.Tensor]] = []
        self.metrics: list[dict[str, float]] = []

    def on_before_optimizer_step(self, trainer, module, optimizer):
        self.grads.append({n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None})

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.weights.append({n: tensors(getattr(module, n)) for n in NETWORKS})
        self.metrics.append(dict(module.step_metrics))


def fit(teacher_dir, micro_batches: int, steps: int = 2, **hparams) -> tuple[DMD2Module, StepSnapshots]:
    """``steps`` steps on the same batch of 4; student_update_freq 2: step 0 critic, step 1 student."""
    module = DMD2Module(str(teacher_dir), student_update_freq=2, accumulate_micro_batches=micro_batches,
                        **{**FAST, **hparams})
    batch = clip_batch()
    module.set_negative_prompt(torch.zeros(1, 8, 384), torch.zeros(1, 8, dtype=torch.bool))
    snapshots = StepSnapshots()
    trainer(steps, [snapshots], log_every_n_steps=1).fit(module, DataLoader([batch] * steps, batch_size=None))
    return module, snapshots


def test_four_micro_batches_make_the_update_of_one_batch_of_four(teacher_dir):
    """Critic step then student step, both clipped (max norm below the gradients' norms), on
    one batch of 4 vs 4 micro-batches of 1: same losses and logs, same accumulated
    pre-clip gradient norms, same applied gradients and same updated weights after each step."""
    clip = dict(critic_grad_clip=0.05, student_grad_clip=0.05)
    _, whole = fit(teacher_dir, 1, **clip)
    _, micro = fit(teacher_dir, 4, **clip)
    for step in (0, 1):
        assert micro.metrics[step].keys() == whole.metrics[step].keys()
        for key, value in whole.metrics[step].items():
            assert micro.metrics[step][key] == pytest.approx(value, rel=1e-5, abs=1e-7), (step, key)
        norms = [v for k, v in whole.metrics[step].items() if k.startswith("train/grad_norm_")]
        assert norms and all(v > 0.05 for v in norms)  # clipping was active
        assert micro.grads[step].keys() == whole.grads[step].keys()
        for name, grad in whole.grads[step].items():
            torch.testing.assert_close(micro.grads[step][name], grad, rtol=1e-4, atol=1e-8, msg=(step, name))
            # AdamW's first steps move a weight by about lr * g / (|g| + 1e-8), so gradients near
            # 1e-8 (the discriminator's conv bias, followed by a GroupNorm, gets ~5e-9) that agree
            # to 1e-9 still move their weights apart by ~1e-4: compare the others' weights
            net, key = name.split(".", 1)
            moved = grad.abs() > 1e-6
            torch.testing.assert_close(micro.weights[step][net][key][moved], whole.weights[step][net][key][moved],
                                       rtol=0, atol=1e-5, msg=(step, name))
    assert "train/critic_loss" in whole.metrics[0] and "train/generator_loss" in whole.metrics[1]


def test_a_non_finite_micro_batch_skips_the_whole_update(teacher_dir):
    """The second of 2 micro-batches of a critic step has NaN velocities: the gradient the
    first one accumulated is dropped too, no weight moves."""
    module = DMD2Module(str(teacher_dir), student_update_freq=2, accumulate_micro_batches=2, **FAST)
    before = {n: tensors(getattr(module, n)) for n in NETWORKS}
    calls = []
    poison_fake_score(module, lambda step: calls.append(step) or len(calls) == 2)
    module.set_negative_prompt(torch.zeros(1, 8, 384), torch.zeros(1, 8, dtype=torch.bool))
    with pytest.warns(UserWarning, match="non-finite"):
        trainer(1).fit(module, DataLoader([clip_batch()], batch_size=None))
    assert len(calls) == 2 and module.nonfinite_total == 1
    assert math.isnan(module.step_metrics["train/critic_loss"])
    for net in NETWORKS:
        after = tensors(getattr(module, net))
        assert all(torch.equal(after[k], v) for k, v in before[net].items()), net
