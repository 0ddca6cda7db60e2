"""DMD2 with a LoRA fake score (``fake_score_lora_rank``): parameter count, init, which weights
each phase moves, block features and gradient checkpointing through peft, checkpoint resume.

Same tiny Wan teacher and data as tests/training/test_dmd2.py (its fixtures are reused).
"""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch import nn

from distill_pl.models.conditioning import Conditioning
from distill_pl.models.lora import add_lora, lora_parameters
from distill_pl.training.dmd2 import DMD2Module
from tests.training.test_dmd2 import FAST, Kill, Killed, dm, teacher_dir, tensors, trainer  # noqa: F401

RANK = 4
pytestmark = pytest.mark.usefixtures("one_thread")


def closed_form_lora_size(blocks: nn.Module, rank: int, targets: tuple[str, ...]) -> int:
    """sum of ``r * (in + out)`` over the Linear layers of the blocks that LoRA targets."""
    return sum(
        rank * (m.in_features + m.out_features)
        for name, m in blocks.named_modules()
        if isinstance(m, nn.Linear) and name.endswith(targets)
    )


def adapters(module: DMD2Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in lora_parameters(module.fake_score).items()}


def base(module: DMD2Module) -> dict[str, torch.Tensor]:
    names = set(lora_parameters(module.fake_score))
    return {k: v for k, v in tensors(module.fake_score).items() if k not in names}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def inputs(module: DMD2Module, batch: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, 4, 16, 16, generator=g)
    cond = Conditioning(torch.randn(batch, 8, 384, generator=g), torch.ones(batch, 8, dtype=torch.bool),
                        torch.randn(batch, 3, 4, 16, 16, generator=g))
    return x, torch.rand(batch, generator=g), cond


# --- construction ------------------------------------------------------------------------------
@pytest.mark.parametrize("teacher_dtype", ["float32", "bfloat16"])
def test_only_adapters_are_trainable_and_count_matches_closed_form(teacher_dir, teacher_dtype):
    module = DMD2Module(str(teacher_dir), fake_score_lora_rank=RANK, teacher_dtype=teacher_dtype)
    trainable = {n: p for n, p in module.fake_score.named_parameters() if p.requires_grad}
    expected = closed_form_lora_size(module.teacher.blocks, RANK, module.teacher.lora_targets)
    assert expected == 2 * RANK * (8 * (16 + 16) + (16 + 32) + (32 + 16))  # 2 blocks: 8 attention, 2 FFN linears
    assert sum(p.numel() for p in trainable.values()) == expected
    assert trainable.keys() == lora_parameters(module.fake_score).keys()
    assert all(p.dtype == torch.float32 for p in trainable.values())
    assert module.fake_score.transformer.dtype == getattr(torch, teacher_dtype)  # base in teacher's dtype
    assert all(p.requires_grad for p in module.student.parameters())  # the student is untouched
    critic, student = module.configure_optimizers()
    groups = {g["name"]: g["params"] for g in critic.param_groups}
    assert {id(p) for p in groups["fake_score"]} == {id(p) for p in trainable.values()}
    assert {id(p) for p in groups["discriminator"]} == {id(p) for p in module.discriminator.parameters()}


def test_adapters_do_not_depend_on_the_global_rng(teacher_dir):
    torch.manual_seed(1)
    a = adapters(DMD2Module(str(teacher_dir), fake_score_lora_rank=RANK))
    torch.manual_seed(2)
    b = adapters(DMD2Module(str(teacher_dir), fake_score_lora_rank=RANK))
    assert same(a, b) and any(v.abs().sum() > 0 for v in a.values())


def test_at_init_lora_fake_score_equals_plain_fake_score_with_features(teacher_dir):
    plain = DMD2Module(str(teacher_dir))
    lora = DMD2Module(str(teacher_dir), fake_score_lora_rank=RANK, fake_score_lora_alpha=8.0)
    assert all(torch.count_nonzero(v) == 0 for k, v in adapters(lora).items() if ".lora_B." in k)  # B = 0
    x, sigma, cond = inputs(plain)
    with torch.no_grad():
        v_plain, f_plain = plain.fake_score(x, sigma, cond, feature_block=1)
        v_lora, f_lora = lora.fake_score(x, sigma, cond, feature_block=1)
    assert f_lora.shape == (2, 16, 4, 8, 8)
    assert torch.equal(v_lora, v_plain) and torch.equal(f_lora, f_plain)


def test_features_and_gradient_checkpointing_through_peft(teacher_dir):
    """With nonzero B, the features of block 0 (hook through the peft-adapted block) and the
    adapter gradients are the same with and without per-block checkpointing; the base gets none."""
    results = []
    for checkpointing in (False, True):
        module = DMD2Module(str(teacher_dir), fake_score_lora_rank=RANK, gradient_checkpointing=checkpointing)
        assert module.fake_score.transformer.is_gradient_checkpointing is checkpointing
        with torch.no_grad():
            for name, p in lora_parameters(module.fake_score).items():
                if ".lora_B." in name:
                    p.copy_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))))
        x, sigma, cond = inputs(module)
        v, features = module.fake_score(x, sigma, cond, feature_block=0)
        (v.square().mean() + module.discriminator(features).mean()).backward()
        assert all(p.grad is None for n, p in module.fake_score.named_parameters() if not p.requires_grad)
        grads = {n: p.grad.clone() for n, p in lora_parameters(module.fake_score).items()}
        assert all(g.abs().sum() > 0 for g in grads.values())
        results.append((features.detach(), grads))
    (f_a, g_a), (f_b, g_b) = results
    torch.testing.assert_close(f_b, f_a, rtol=0, atol=0)
    for name in g_a:
        torch.testing.assert_close(g_b[name], g_a[name], rtol=1e-5, atol=1e-7, msg=name)


def test_add_lora_rejects_targets_that_match_nothing(teacher_dir):
    module = DMD2Module(str(teacher_dir))
    with pytest.raises(ValueError, match="not found in the base model"):
        add_lora(module.fake_score, RANK, target_modules=["no_such_layer"])


# --- training ------------------------------------------------------------------------------------
class Changes(L.Callback):
    """Per step: did the student, the fake score's adapters, its base, the head change?"""

    def __init__(self):
        self.rows: list[dict[str, bool]] = []

    def snapshot(self, module):
        return dict(student=tensors(module.student), adapters=adapters(module), base=base(module),
                    discriminator=tensors(module.discriminator))

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self._before = self.snapshot(module)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        after = self.snapshot(module)
        self.rows.append({k: not same(v, after[k]) for k, v in self._before.items()})


@pytest.mark.parametrize("teacher_dtype", ["float32", "bfloat16"])
def test_critic_moves_only_adapters_and_student_step_leaves_them(teacher_dir, dm, teacher_dtype):
    module = DMD2Module(str(teacher_dir), fake_score_lora_rank=RANK, teacher_dtype=teacher_dtype,
                        gradient_checkpointing=True, **FAST)
    base_before = base(module)
    changes = Changes()
    t = trainer(5, [changes])
    t.fit(module, datamodule=dm)
    critic_rows, (student_row,) = changes.rows[:4], changes.rows[4:]
    for row in critic_rows:
        assert row == dict(student=False, adapters=True, base=False, discriminator=True), row
    assert student_row == dict(student=True, adapters=False, base=False, discriminator=False)
    assert same(base_before, base(module))  # bit-identical frozen base after the run
    assert not any(p.requires_grad for n, p in module.fake_score.named_parameters()
                   if n not in lora_parameters(module.fake_score))  # untoggling kept the base frozen
    critic, _ = t.optimizers
    assert len(critic.state) == len(lora_parameters(module.fake_score)) + len(list(module.discriminator.parameters()))


def test_kill_and_resume_restores_adapters(teacher_dir, dm, tmp_path):
    """10 steps straight vs. killed at step 8 and resumed from the step-6 checkpoint: the
    checkpoint holds the adapters, and the resumed run ends with the same adapters, base, head
    and student."""
    options = dict(fake_score_lora_rank=RANK, fake_score_lora_alpha=2.0, **FAST)
    module_a = DMD2Module(str(teacher_dir), **options)
    trainer(10).fit(module_a, datamodule=dm)

    ckpts = tmp_path / "ckpts"
    saver = L.pytorch.callbacks.ModelCheckpoint(dirpath=ckpts, every_n_train_steps=6, save_top_k=-1)
    module_b = DMD2Module(str(teacher_dir), **options)
    t_b = trainer(10, [saver, Kill(8)], enable_checkpointing=True, root=tmp_path)
    with pytest.raises(Killed):
        t_b.fit(module_b, datamodule=dm)
    (ckpt,) = ckpts.glob("*step=6.ckpt")
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    saved = {k.removeprefix("fake_score."): v for k, v in state.items() if ".lora_" in k}
    assert saved.keys() == lora_parameters(module_b.fake_score).keys()

    module_c = DMD2Module(str(teacher_dir), **options)
    assert not same(adapters(module_c), saved)
    loaded = DMD2Module.load_from_checkpoint(ckpt)
    assert same(adapters(loaded), saved)
    trainer(10).fit(module_c, datamodule=dm, ckpt_path=ckpt)
    for name in ("student", "fake_score", "discriminator"):
        a, c = tensors(getattr(module_a, name)), tensors(getattr(module_c, name))
        assert a.keys() == c.keys()
        for key in a:
            torch.testing.assert_close(c[key], a[key], rtol=1e-5, atol=1e-7, msg=f"{name}.{key}")
