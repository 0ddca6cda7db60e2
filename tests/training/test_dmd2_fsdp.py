"""configs/tiny/dmd2.yaml on 2 CPU processes sharded with FSDP2 (``distill_pl.training.strategies.FSDP2Strategy``,
gloo) through the real ``distill-pl`` command: with 2 micro-batches per step, the same losses
and exported student as one process with the 2-process global batch; exact resume from a
distributed checkpoint.

Slow (each run starts its processes): deselected by default, run with ``-m slow``.
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.training.test_dmd2 import teacher_dir, tiny_config  # noqa: F401

pytestmark = pytest.mark.slow
EXPORT = "runs/tiny/dmd2/export/transformer/diffusion_pytorch_model.safetensors"


class StepLossRecorder(L.Callback):
    """Appends ``{"step", "loss"}`` (this rank's critic or generator loss) to ``losses/rank<r>.jsonl``."""

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        m = module.step_metrics
        row = {"step": trainer.global_step - 1, "loss": m.get("train/generator_loss", m.get("train/critic_loss"))}
        path = Path("losses") / f"rank{trainer.global_rank}.jsonl"
        path.parent.mkdir(exist_ok=True)
        with path.open("a") as f:
            f.write(json.dumps(row) + "\n")


def config(work: Path, teacher: Path, devices: int, batch_size: int, micro: int, kill_at: int | None = None) -> Path:
    """10 steps (critic x4, student, critic x4, student), a checkpoint every 5, no init_from."""
    path = tiny_config(work / "dmd2.yaml", teacher, max_steps=10)
    cfg = yaml.safe_load(path.read_text())
    t = cfg["trainer"]
    t["devices"] = devices
    if devices > 1:
        t["strategy"] = {"class_path": "distill_pl.training.strategies.FSDP2Strategy"}
    t["callbacks"].append({"class_path": "tests.training.test_dmd2_fsdp.StepLossRecorder"})
    if kill_at is not None:
        t["callbacks"].append({"class_path": "tests.training.test_kd.KillAtStep", "init_args": {"step": kill_at}})
    cfg["model"]["init_args"].update(init_from=None, accumulate_micro_batches=micro, student_lr=1e-3,
                                     fake_score_lr=1e-3, discriminator_lr=1e-3)
    cfg["data"].update(batch_size=batch_size, val_batch_size=batch_size)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def losses(work: Path) -> dict[int, dict[int, float]]:
    table: dict[int, dict[int, float]] = {}
    for path in sorted((work / "losses").glob("rank*.jsonl")):
        rank = int(path.stem[4:])
        for line in path.read_text().splitlines():
            row = json.loads(line)
            table.setdefault(rank, {})[row["step"]] = row["loss"]
    return table


@pytest.fixture(scope="module")
def fsdp_run(teacher_dir, tmp_path_factory) -> Path:
    from tests.cli_helpers import run_cli

    work = tmp_path_factory.mktemp("dmd2_fsdp")
    run_cli(["fit", "--config", str(config(work, teacher_dir, devices=2, batch_size=2, micro=2))], cwd=work)
    return work


def test_fsdp_run_with_micro_batches_matches_one_process(teacher_dir, fsdp_run, tmp_path):
    """2 sharded ranks x batch 2 in 2 micro-batches vs 1 process x batch 4: per step the mean
    of the ranks' losses is the single process's loss; the exported EMA students agree."""
    from tests.cli_helpers import run_cli

    run_cli(["fit", "--config", str(config(tmp_path, teacher_dir, devices=1, batch_size=4, micro=1))], cwd=tmp_path)
    one, two = losses(tmp_path), losses(fsdp_run)
    assert sorted(two) == [0, 1] and sorted(one[0]) == sorted(two[0]) == list(range(10))
    for step, loss in one[0].items():
        assert (two[0][step] + two[1][step]) / 2 == pytest.approx(loss, rel=1e-4), step
    a, b = load_file(tmp_path / EXPORT), load_file(fsdp_run / EXPORT)
    assert a.keys() == b.keys()
    for key, value in a.items():
        torch.testing.assert_close(b[key], value, rtol=0, atol=1e-5, msg=key)


def test_killed_fsdp_run_resumes_exactly(teacher_dir, fsdp_run, tmp_path):
    """Killed at step 5 (checkpoint after the first student step), resumed with --ckpt_path
    last: the losses of steps 0..9 and the export equal the uninterrupted sharded run's."""
    from tests.cli_helpers import run_cli, start_cli

    proc = start_cli(["fit", "--config", str(config(tmp_path, teacher_dir, 2, 2, 2, kill_at=5))], cwd=tmp_path)
    assert proc.wait(timeout=300) == -9, proc.stderr.read().decode()[-3000:]
    assert (tmp_path / "runs/tiny/dmd2/checkpoints/last.ckpt").is_dir()
    run_cli(["fit", "--config", str(config(tmp_path, teacher_dir, 2, 2, 2)), "--ckpt_path", "last"], cwd=tmp_path)
    resumed, full = losses(tmp_path), losses(fsdp_run)
    for rank in (0, 1):
        assert sorted(resumed[rank]) == list(range(10))
        for step, loss in full[rank].items():
            assert resumed[rank][step] == pytest.approx(loss, rel=1e-6, abs=1e-8), (rank, step)
    final, reference = load_file(tmp_path / EXPORT), load_file(fsdp_run / EXPORT)
    for key, value in reference.items():
        torch.testing.assert_close(final[key], value, rtol=1e-5, atol=1e-6, msg=key)
