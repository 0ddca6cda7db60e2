"""configs/tiny-cosmos-transfer2.5 KD and DMD2 on 2 CPU processes sharded with FSDP2
(``distill_pl.training.strategies.FSDP2Strategy``, gloo) through the real ``distill-pl`` command: the
Cosmos adapter's FSDP units are every base and every ControlNet block, and the runs give the
same losses and the same exported student (base + ControlNet) as one process with the
2-process global batch, in latent space with the tiny VAE.

Slow (each run starts its processes): deselected by default, run with ``-m slow``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.cli_helpers import edited_config, run_cli
from tests.families import cosmos_tiny
from tests.training.test_dmd2_fsdp import losses as dmd2_losses
from tests.training.test_kd_ddp import losses as kd_losses

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

CONFIGS = "configs/tiny-cosmos-transfer2.5"
RUNS = "runs/tiny-cosmos-transfer2.5"
FSDP2 = {"class_path": "distill_pl.training.strategies.FSDP2Strategy"}


@pytest.fixture(scope="module")
def pairs_work(tmp_path_factory) -> Path:
    """The tiny teacher and 8 train + 2 val KD pairs (2 sampling steps), one process."""
    work = tmp_path_factory.mktemp("cosmos_fsdp")
    cosmos_tiny.write_tiny_cosmos_transfer(work / RUNS / "teacher")

    def pairs(cfg):
        cfg["model"]["init_args"]["num_steps"] = 2
        cfg["data"].update(num_examples=8, num_val_examples=2, shard_size=2, batch_size=2)

    run_cli(["predict", "--config", str(edited_config(f"{CONFIGS}/kd_pairs.yaml", work / "p.yaml", pairs))],
            cwd=work)
    return work


def copy_work(pairs_work: Path, dest: Path) -> Path:
    for name in (f"{RUNS}/teacher", f"{RUNS}/kd_pairs", "runs/cache"):
        shutil.copytree(pairs_work / name, dest / name, symlinks=True)
    return dest


def exported(export: Path) -> dict[str, torch.Tensor]:
    """The exported student's base and ControlNet weights, keyed ``<part>.<name>``."""
    weights = {}
    for part in ("transformer", "controlnet"):
        for file in sorted((export / part).glob("*.safetensors")):
            weights.update({f"{part}.{k}": v for k, v in load_file(file).items()})
    return weights


def assert_same_run(single: dict, sharded: dict, rel: float) -> None:
    """Per step, the mean of the 2 ranks' losses is the single process's loss."""
    assert sorted(single) == [0] and sorted(sharded) == [0, 1]
    assert sorted(single[0]) == sorted(sharded[0]) == sorted(sharded[1])
    for step, loss in single[0].items():
        assert (sharded[0][step] + sharded[1][step]) / 2 == pytest.approx(loss, rel=rel), step


def assert_same_student(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys() and any(k.startswith("controlnet.") for k in a)
    for key, value in a.items():
        torch.testing.assert_close(b[key], value, rtol=0, atol=atol, msg=key)


def kd_config(work: Path, devices: int, batch_size: int) -> Path:
    """4 KD steps (8 pairs, global batch 4: 2 epochs), validation and a checkpoint at step 4."""

    def edit(cfg):
        t = cfg["trainer"]
        t.update(devices=devices, max_steps=4, val_check_interval=2, limit_val_batches=1, log_every_n_steps=1)
        if devices > 1:
            t["strategy"] = FSDP2
        t["callbacks"][0]["init_args"]["every_n_train_steps"] = 4
        t["callbacks"].append({"class_path": "tests.training.test_kd_ddp.LossRecorder"})
        cfg["model"]["init_args"].update(lr=1e-3, ema_decay=0.9)
        cfg["data"].update(batch_size=batch_size, val_batch_size=batch_size)

    return edited_config(f"{CONFIGS}/kd.yaml", work / "kd.yaml", edit)


def dmd2_config(work: Path, devices: int, batch_size: int) -> Path:
    """5 DMD2 steps (4 critic, 1 student) from the teacher's weights, a checkpoint at step 5."""

    def edit(cfg):
        t = cfg["trainer"]
        t.update(devices=devices, max_steps=5)
        if devices > 1:
            t["strategy"] = FSDP2
        t["callbacks"][0]["init_args"]["every_n_train_steps"] = 5
        t["callbacks"][1]["init_args"]["every_n_steps"] = 5
        t["callbacks"].append({"class_path": "tests.training.test_dmd2_fsdp.StepLossRecorder"})
        cfg["model"]["init_args"].update(init_from=None, discriminator_hidden=8, student_lr=1e-3,
                                         fake_score_lr=1e-3, discriminator_lr=1e-3)
        cfg["data"].update(batch_size=batch_size, val_batch_size=batch_size, samples_per_epoch=8)

    return edited_config(f"{CONFIGS}/dmd2.yaml", work / "dmd2.yaml", edit)


def test_kd_under_fsdp2_matches_one_process(pairs_work, tmp_path):
    """2 sharded ranks x batch 2 vs 1 process x batch 4: the same per-step losses, a
    distributed checkpoint (one shard per rank, no teacher keys), and the same exported
    Cosmos2_5_TransferPipeline student, which ``distill-pl export`` of the distributed
    checkpoint writes again."""
    sharded = copy_work(pairs_work, tmp_path / "sharded")
    single = copy_work(pairs_work, tmp_path / "single")
    run_cli(["fit", "--config", str(kd_config(sharded, devices=2, batch_size=2))], cwd=sharded, timeout=600)
    run_cli(["fit", "--config", str(kd_config(single, devices=1, batch_size=4))], cwd=single, timeout=600)

    one, two = kd_losses(single), kd_losses(sharded)
    assert sorted(one[0]) == list(range(4))
    assert_same_run(one, two, rel=1e-5)
    last = sharded / RUNS / "kd/checkpoints/last.ckpt"
    assert last.is_dir() and sorted(p.name for p in last.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    from torch.distributed.checkpoint import FileSystemReader

    keys = FileSystemReader(str(last)).read_metadata().state_dict_metadata
    assert any(k.startswith("state_dict.student_ema.module.controlnet.") for k in keys)
    assert not any(k.startswith("state_dict.teacher.") for k in keys)
    assert_same_student(exported(single / RUNS / "kd/export"), exported(sharded / RUNS / "kd/export"), atol=2e-5)
    # distill-pl export of the distributed checkpoint: the run's own export, bit for bit
    run_cli(["export", "--ckpt", str(last), "--out", str(tmp_path / "student")], cwd=sharded)
    assert_same_student(exported(sharded / RUNS / "kd/export"), exported(tmp_path / "student"), atol=0)


def test_dmd2_under_fsdp2_matches_one_process(pairs_work, tmp_path):
    """DMD2 (real clips, canny control through the VAE, critic and student phases): 2 sharded
    ranks x batch 2 vs 1 process x batch 4 give the same losses and exported student."""
    sharded = copy_work(pairs_work, tmp_path / "sharded")
    single = copy_work(pairs_work, tmp_path / "single")
    run_cli(["fit", "--config", str(dmd2_config(sharded, devices=2, batch_size=2))], cwd=sharded, timeout=600)
    run_cli(["fit", "--config", str(dmd2_config(single, devices=1, batch_size=4))], cwd=single, timeout=600)

    one, two = dmd2_losses(single), dmd2_losses(sharded)
    assert sorted(one[0]) == list(range(5))
    assert_same_run(one, two, rel=1e-4)
    assert (sharded / RUNS / "dmd2/checkpoints/last.ckpt").is_dir()  # a distributed checkpoint
    assert_same_student(exported(single / RUNS / "dmd2/export"), exported(sharded / RUNS / "dmd2/export"), atol=2e-5)
