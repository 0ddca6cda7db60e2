"""DMD2 with a LoRA student (``student_lora_rank``): the student's base is its initial weights
(``init_from`` or the teacher) frozen in ``teacher_dtype``, only its adapters train, and every
export (the run's own at the end of fit, ``distill-pl export`` of a checkpoint) merges the
adapters into plain full weights that compute what the adapted student computes (and writes
them as the teacher's LoRA file too: tests/export/test_lora_files.py).

Same tiny Wan teacher and data as tests/training/test_dmd2.py (its fixtures are reused).
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from distill_pl.export.checkpoint import export_student
from distill_pl.families.registry import load_denoiser
from distill_pl.models.lora import lora_parameters, lora_scale, merged_lora_state
from distill_pl.models.sharding import gather_denoiser
from distill_pl.training.dmd2 import DMD2Module
from tests.training.test_dmd2 import FAST, dm, kd_checkpoint, same, teacher_dir, tensors, trainer  # noqa: F401
from tests.training.test_dmd2_lora import Changes, inputs

RANK = 4
pytestmark = pytest.mark.usefixtures("one_thread")


def perturb_adapters(denoiser) -> None:
    """Nonzero B (B starts at 0), so the adapters change what the network computes."""
    with torch.no_grad():
        for name, p in lora_parameters(denoiser).items():
            if ".lora_B." in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))))


@pytest.mark.parametrize("teacher_dtype", ["float32", "bfloat16"])
def test_lora_student_base_is_the_init_weights_and_only_adapters_train(teacher_dir, kd_checkpoint, teacher_dtype):
    path, kd_student, kd_ema = kd_checkpoint
    module = DMD2Module(str(teacher_dir), init_from=str(path), student_lora_rank=RANK, teacher_dtype=teacher_dtype)
    adapters = lora_parameters(module.student)
    trainable = {n: p for n, p in module.student.named_parameters() if p.requires_grad}
    assert trainable.keys() == adapters.keys() and adapters
    assert all(p.dtype == torch.float32 for p in trainable.values())
    assert module.student.transformer.dtype == getattr(torch, teacher_dtype)
    base = {k.replace(".base_layer.", "."): v for k, v in tensors(module.student).items() if ".lora_" not in k}
    assert base.keys() == kd_ema.keys()  # the KD run's EMA weights (init_from_ema), cast to the base dtype
    assert all(torch.equal(base[k], kd_ema[k].to(base[k].dtype)) for k in base)
    _, student_opt = module.configure_optimizers()
    assert {id(p) for p in student_opt.param_groups[0]["params"]} == {id(p) for p in trainable.values()}
    assert all(p.requires_grad for p in module.fake_score.parameters())  # the fake score is untouched


def test_merged_copy_computes_what_the_adapted_student_computes(teacher_dir):
    """In float32 (a bf16 base computes in bf16, the merged copy in float32), and at init
    (B = 0) with a bf16 base: the adapted student computes what its base, the teacher, computes."""
    bf16 = DMD2Module(str(teacher_dir), student_lora_rank=RANK, teacher_dtype="bfloat16")
    x, sigma, cond = inputs(bf16)
    with torch.no_grad():
        torch.testing.assert_close(bf16.student(x, sigma, cond), bf16.teacher(x, sigma, cond), rtol=0, atol=0)
    module = DMD2Module(str(teacher_dir), student_lora_rank=RANK, student_lora_alpha=8.0)
    perturb_adapters(module.student)
    assert lora_scale(module.student) == 2.0
    merged = gather_denoiser(module.student, rank=0)
    assert not lora_parameters(merged) and merged.state_dict().keys() == module.teacher.state_dict().keys()
    assert all(v.dtype == torch.float32 for v in merged.state_dict().values() if v.is_floating_point())
    with torch.no_grad():
        adapted, plain = module.student(x, sigma, cond), merged(x, sigma, cond)
        base = module.teacher(x, sigma, cond)
    torch.testing.assert_close(plain, adapted, rtol=1e-4, atol=1e-5)
    assert (adapted - base).abs().max() > 1e-2  # the adapters matter
    assert gather_denoiser(module.teacher, rank=0) is module.teacher  # no adapters: as it is
    assert merged_lora_state(tensors(module.teacher), lora_scale(module.teacher)).keys() == tensors(
        module.teacher).keys()


def test_fit_trains_only_adapters_and_both_exports_merge_them(teacher_dir, dm, tmp_path):
    """Five steps (4 critic, 1 student) with a bf16 base: the student step moves adapters only;
    the run's export and ``distill-pl export`` of its checkpoint are the same plain folder,
    equal to the merged adapted student."""
    module = DMD2Module(str(teacher_dir), student_lora_rank=RANK, teacher_dtype="bfloat16",
                        export_dir=str(tmp_path / "export"), **FAST)
    base_before = {k: v for k, v in tensors(module.student).items() if ".lora_" not in k}
    adapters_before = {k: v.detach().clone() for k, v in lora_parameters(module.student).items()}
    changes = Changes()
    t = trainer(5, [changes], root=tmp_path)
    t.fit(module, datamodule=dm)
    assert [row["student"] for row in changes.rows] == [False] * 4 + [True]
    assert same(base_before, {k: v for k, v in tensors(module.student).items() if ".lora_" not in k})
    assert not same(adapters_before, {k: v.detach() for k, v in lora_parameters(module.student).items()})

    expected = gather_denoiser(module.student, rank=0).state_dict()
    exported = load_denoiser(str(tmp_path / "export")).state_dict()
    assert exported.keys() == expected.keys()
    assert all(torch.equal(exported[k], expected[k]) for k in expected)
    t.save_checkpoint(tmp_path / "last.ckpt")
    export_student(tmp_path / "last.ckpt", tmp_path / "cli_export")
    from_cli = load_denoiser(str(tmp_path / "cli_export")).state_dict()
    assert all(torch.equal(from_cli[k], expected[k]) for k in expected)
    # both also write the adapters as the teacher's LoRA file (no init_from: the base is the teacher)
    run_lora, cli_lora = (load_file(tmp_path / name / "lora" / "lora.safetensors") for name in ("export", "cli_export"))
    assert run_lora.keys() == cli_lora.keys() and len(run_lora) == len(lora_parameters(module.student))
    assert all(torch.equal(run_lora[k], cli_lora[k]) for k in run_lora)
