"""configs/tiny/kd.yaml on 2 CPU processes sharded with FSDP2 (``distill_pl.training.strategies.FSDP2Strategy``,
Lightning's ModelParallelStrategy, gloo) through the real ``distill-pl`` command: the same losses
and exported student as one process with the 2-process global batch, exact resume from a
distributed checkpoint, and ``distill-pl export`` of that checkpoint.

Slow (each run starts its processes): deselected by default, run with ``-m slow``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.training.test_kd import pairs_workdir  # noqa: F401
from tests.training.test_kd_ddp import config as ddp_config
from tests.training.test_kd_ddp import losses, workdir

pytestmark = pytest.mark.slow
CHECKPOINTS = "runs/tiny/kd/checkpoints"
EXPORT = "runs/tiny/kd/export"


def config(work: Path, devices: int, batch_size: int, kill_at: int | None = None) -> Path:
    """test_kd_ddp's 6-step config, sharded with FSDP2 on more than one device."""
    path = ddp_config(work, devices, batch_size, kill_at)
    if devices > 1:
        cfg = yaml.safe_load(path.read_text())
        cfg["trainer"]["strategy"] = {"class_path": "distill_pl.training.strategies.FSDP2Strategy"}
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def exported(work: Path) -> dict[str, torch.Tensor]:
    return load_file(work / EXPORT / "transformer" / "diffusion_pytorch_model.safetensors")


@pytest.fixture(scope="module")
def fsdp_run(pairs_workdir, tmp_path_factory) -> Path:
    from tests.cli_helpers import run_cli

    work = workdir(pairs_workdir, tmp_path_factory.mktemp("kd_fsdp") / "work")
    run_cli(["fit", "--config", str(config(work, devices=2, batch_size=2))], cwd=work)
    return work


def test_fsdp_run_logs_the_losses_and_exports_the_student_of_one_process(pairs_workdir, fsdp_run, tmp_path):
    """2 sharded ranks x batch 2 vs 1 process x batch 4: per step, the mean of the ranks'
    losses is the single process's loss; the checkpoint is a distributed one (a folder, one
    shard per rank, no teacher keys); the exported (gathered, EMA) students agree."""
    from tests.cli_helpers import run_cli

    single = workdir(pairs_workdir, tmp_path / "single")
    run_cli(["fit", "--config", str(config(single, devices=1, batch_size=4))], cwd=single)
    one, two = losses(single), losses(fsdp_run)
    assert sorted(one) == [0] and sorted(two) == [0, 1]
    assert sorted(one[0]) == sorted(two[0]) == sorted(two[1]) == list(range(6))
    for step, loss in one[0].items():
        assert (two[0][step] + two[1][step]) / 2 == pytest.approx(loss, rel=1e-5), step
    last = fsdp_run / CHECKPOINTS / "last.ckpt"
    assert last.is_dir() and sorted(p.name for p in last.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    from torch.distributed.checkpoint import FileSystemReader

    keys = FileSystemReader(str(last)).read_metadata().state_dict_metadata
    assert any(k.startswith("state_dict.student_ema.module.") for k in keys)
    assert not any(k.startswith("state_dict.teacher.") for k in keys)
    a, b = exported(single), exported(fsdp_run)
    assert a.keys() == b.keys()
    for key, value in a.items():
        torch.testing.assert_close(b[key], value, rtol=0, atol=2e-5, msg=key)


def test_killed_fsdp_run_resumes_exactly_from_its_distributed_checkpoint(pairs_workdir, fsdp_run, tmp_path):
    """Both ranks SIGKILLed at step 3, resumed with --ckpt_path last (a distributed
    checkpoint) on 2 processes: every rank's losses of steps 0..5 and the exported student
    equal the uninterrupted sharded run's."""
    from tests.cli_helpers import run_cli, start_cli

    work = workdir(pairs_workdir, tmp_path / "killed")
    proc = start_cli(["fit", "--config", str(config(work, devices=2, batch_size=2, kill_at=3))], cwd=work)
    assert proc.wait(timeout=300) == -9, proc.stderr.read().decode()[-3000:]
    assert (work / CHECKPOINTS / "last.ckpt").is_dir()
    run_cli(["fit", "--config", str(config(work, devices=2, batch_size=2)), "--ckpt_path", "last"], cwd=work)
    resumed, full = losses(work), losses(fsdp_run)
    for rank in (0, 1):
        assert sorted(resumed[rank]) == list(range(6))
        for step, loss in full[rank].items():
            assert resumed[rank][step] == pytest.approx(loss, rel=1e-6, abs=1e-8), (rank, step)
    final, reference = exported(work), exported(fsdp_run)
    for key, value in reference.items():
        torch.testing.assert_close(final[key], value, rtol=1e-5, atol=1e-6, msg=key)


def test_export_command_consolidates_the_distributed_checkpoint(fsdp_run, tmp_path):
    """``distill-pl export --ckpt <last.ckpt folder> --out <folder>`` writes the EMA student of
    the sharded checkpoint as one diffusers folder: the same weights as the run's own export
    (both after step 6) and the one-step scheduler."""
    from tests.cli_helpers import run_cli

    out = tmp_path / "student"
    run_cli(["export", "--ckpt", str(fsdp_run / CHECKPOINTS / "last.ckpt"), "--out", str(out)], cwd=fsdp_run)
    weights = load_file(out / "transformer" / "diffusion_pytorch_model.safetensors")
    reference = exported(fsdp_run)
    assert weights.keys() == reference.keys()
    for key, value in reference.items():
        torch.testing.assert_close(weights[key], value, rtol=0, atol=0, msg=key)
    assert (out / "scheduler" / "scheduler_config.json").is_file()
