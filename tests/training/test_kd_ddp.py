"""configs/tiny/kd.yaml on 2 CPU processes (DDP, gloo) through the real `distill-pl` command:
the same losses as one process with the 2-process global batch, and exact mid-epoch resume.

Slow (each run starts its processes): deselected by default, run with ``-m slow``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import lightning as L
import pytest
import torch

from tests.training.test_kd import E2E_DATA, pairs_workdir  # noqa: F401

pytestmark = pytest.mark.slow


class LossRecorder(L.Callback):
    """Appends ``{"rank", "step", "loss"}`` of every training step of this rank to
    ``losses/rank<r>.jsonl`` in the working directory (the TensorBoard ``train/loss`` is rank
    0's share of the batch only)."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        path = Path("losses") / f"rank{trainer.global_rank}.jsonl"
        path.parent.mkdir(exist_ok=True)
        row = {"rank": trainer.global_rank, "step": trainer.global_step - 1, "loss": float(outputs["loss"])}
        with path.open("a") as f:
            f.write(json.dumps(row) + "\n")


def config(work: Path, devices: int, batch_size: int, kill_at: int | None = None) -> Path:
    """6 steps of configs/tiny/kd.yaml (16 train pairs: 4 steps per epoch at a global batch
    of 4), validation and a checkpoint every 3 steps."""
    from tests.cli_helpers import edited_config

    def edit(cfg):
        t = cfg["trainer"]
        t.update(devices=devices, max_steps=6, val_check_interval=3, limit_val_batches=1, log_every_n_steps=1)
        if devices > 1:
            t["strategy"] = "ddp"
        t["callbacks"][0]["init_args"]["every_n_train_steps"] = 3
        # FrameGridLogger stays: it must not hang a run on several devices (trainer.log_dir is
        # a broadcast every rank joins)
        t["callbacks"].append({"class_path": "tests.training.test_kd_ddp.LossRecorder"})
        if kill_at is not None:
            t["callbacks"].append({"class_path": "tests.training.test_kd.KillAtStep", "init_args": {"step": kill_at}})
        cfg["model"]["init_args"].update(teacher="teacher", lr=1e-3, ema_decay=0.9)
        cfg["data"].update(batch_size=batch_size, val_batch_size=batch_size, **E2E_DATA)

    return edited_config("configs/tiny/kd.yaml", work / "kd.yaml", edit)


def workdir(pairs_workdir: Path, dest: Path) -> Path:
    dest.mkdir()
    for name in ("teacher", "runs/tiny/kd_pairs", "runs/cache"):
        shutil.copytree(pairs_workdir / name, dest / name, symlinks=True)
    return dest


def losses(work: Path) -> dict[int, dict[int, float]]:
    """{rank: {step: loss}}; every step recorded once per rank."""
    table: dict[int, dict[int, float]] = {}
    for path in sorted((work / "losses").glob("rank*.jsonl")):
        for line in path.read_text().splitlines():
            row = json.loads(line)
            steps = table.setdefault(row["rank"], {})
            assert row["step"] not in steps, (path, row)
            steps[row["step"]] = row["loss"]
    return table


def last_checkpoint(work: Path) -> dict:
    return torch.load(work / "runs/tiny/kd/checkpoints/last.ckpt", map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def two_process_run(pairs_workdir, tmp_path_factory) -> Path:
    from tests.cli_helpers import run_cli

    work = workdir(pairs_workdir, tmp_path_factory.mktemp("kd_ddp") / "work")
    run_cli(["fit", "--config", str(config(work, devices=2, batch_size=2))], cwd=work)
    return work


def test_two_processes_log_the_losses_of_one_process_with_their_global_batch(pairs_workdir, two_process_run,
                                                                            tmp_path):
    """2 ranks x batch 2 vs 1 process x batch 4: per step, the mean of the ranks' losses is
    the single process's loss; the (synced) validation losses and the final student, EMA
    and optimizer moments agree."""
    from tests.cli_helpers import run_cli, scalar_events

    single = workdir(pairs_workdir, tmp_path / "single")
    run_cli(["fit", "--config", str(config(single, devices=1, batch_size=4))], cwd=single)
    one, two = losses(single), losses(two_process_run)
    assert sorted(one) == [0] and sorted(two) == [0, 1]
    assert sorted(one[0]) == sorted(two[0]) == sorted(two[1]) == list(range(6))
    for step, loss in one[0].items():
        assert (two[0][step] + two[1][step]) / 2 == pytest.approx(loss, rel=1e-5), step
        assert two[0][step] != pytest.approx(two[1][step], rel=1e-3), step  # the ranks saw other pairs
    run = "runs/tiny/kd"
    val_one, val_two = scalar_events(single / run, "val/loss"), scalar_events(two_process_run / run, "val/loss")
    assert sorted(val_one) == sorted(val_two) == [2, 5]
    for step, value in val_one.items():
        assert val_two[step] == pytest.approx(value, rel=1e-5), step
    a, b = last_checkpoint(single), last_checkpoint(two_process_run)
    assert a["global_step"] == b["global_step"] == 6
    for key, value in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][key], value, rtol=0, atol=2e-5, msg=key)
    for index, state in a["optimizer_states"][0]["state"].items():
        torch.testing.assert_close(b["optimizer_states"][0]["state"][index]["exp_avg"], state["exp_avg"],
                                   rtol=1e-3, atol=1e-8)


def test_killed_two_process_run_resumes_exactly(pairs_workdir, two_process_run, tmp_path):
    """Both ranks SIGKILLed at step 3 (mid-epoch: batch 3 of 4), resumed with --ckpt_path
    last on 2 processes: every rank's losses of steps 0..5 (0..2 before the kill, 3..5 after)
    and the final weights equal the uninterrupted 2-process run's."""
    from tests.cli_helpers import run_cli, start_cli

    work = workdir(pairs_workdir, tmp_path / "killed")
    proc = start_cli(["fit", "--config", str(config(work, devices=2, batch_size=2, kill_at=3))], cwd=work)
    assert proc.wait(timeout=300) == -9, proc.stderr.read().decode()[-3000:]
    saved = last_checkpoint(work)
    assert saved["global_step"] == 3
    assert saved["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [{"epoch": 0, "batches_yielded": 3}]

    run_cli(["fit", "--config", str(config(work, devices=2, batch_size=2)), "--ckpt_path", "last"], cwd=work)
    resumed, full = losses(work), losses(two_process_run)
    assert sorted(resumed) == [0, 1]
    for rank in (0, 1):
        assert sorted(resumed[rank]) == list(range(6))
        for step, loss in full[rank].items():
            assert resumed[rank][step] == pytest.approx(loss, rel=1e-6, abs=1e-8), (rank, step)
    final, reference = last_checkpoint(work)["state_dict"], last_checkpoint(two_process_run)["state_dict"]
    assert final.keys() == reference.keys()
    for key, value in reference.items():
        torch.testing.assert_close(final[key], value, rtol=1e-5, atol=1e-6, msg=key)
