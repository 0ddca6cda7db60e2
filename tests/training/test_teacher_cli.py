"""The tiny teacher config through the real ``distill-pl`` command: fit, resume, export, sample."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest
import torch

from tests.cli_helpers import edited_config, run_cli, scalar_events, start_cli


def fast_teacher_config(dest: Path, max_steps: int) -> Path:
    def edit(cfg):
        t = cfg["trainer"]
        t.update(max_steps=max_steps, val_check_interval=max_steps, limit_val_batches=1, log_every_n_steps=1)
        t["callbacks"][0]["init_args"]["every_n_train_steps"] = 2
        cfg["model"]["init_args"].update(sample_steps=2, warmup_steps=2)
        cfg["data"].update(batch_size=2, val_batch_size=2, samples_per_epoch=6)

    return edited_config("configs/tiny/teacher.yaml", dest, edit)


def last_saved_step(path: Path) -> int:
    """global_step of a checkpoint, -1 while there is none."""
    if not path.is_file():
        return -1
    return torch.load(path, map_location="cpu", weights_only=True)["global_step"]


def test_teacher_config_fits_exports_and_samples(tmp_path):
    config = fast_teacher_config(tmp_path / "teacher.yaml", max_steps=4)
    run_cli(["fit", "--config", str(config)], cwd=tmp_path)
    run_dir = tmp_path / "runs/tiny/teacher"
    ckpt = torch.load(run_dir / "checkpoints/last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 4
    assert not any(k.startswith("autoencoder.") and "weight" in k for k in ckpt["state_dict"])
    losses = scalar_events(run_dir, "train/loss")
    assert sorted(losses) == [0, 1, 2, 3] and all(0 < v < 10 for v in losses.values())
    assert scalar_events(run_dir, "val/loss")  # validation ran and logged
    assert list(run_dir.rglob("grids/step000004_0.png"))  # the frame grid was written
    export = run_dir / "export"
    assert (export / "transformer/diffusion_pytorch_model.safetensors").is_file()
    assert (export / "scheduler/scheduler_config.json").is_file()

    out = tmp_path / "samples"
    run_cli(["sample", "--teacher", str(export), "--out", str(out), "--num_videos", "2",
             "--steps", "2", "--data.cache_dir", "runs/cache"], cwd=tmp_path)
    for name in ("sample_0.mp4", "control_1.mp4", "ground_truth_0.mp4", "side_by_side_1.mp4", "grid_0.png", "grid.png"):
        assert (out / name).stat().st_size > 0, name
    import av

    with av.open(str(out / "sample_0.mp4")) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) == 8 and frames[0].shape == (128, 128, 3)  # 8 frames, 32 px x scale 4


@pytest.mark.slow
def test_killed_teacher_run_resumes_from_its_checkpoint(tmp_path):
    """SIGKILL a real run after a checkpoint, resume with --ckpt_path last: the resumed run
    starts at the saved step and reproduces the uninterrupted run's losses."""
    max_steps = 8
    full_dir, killed_dir = tmp_path / "full", tmp_path / "killed"
    full_dir.mkdir(), killed_dir.mkdir()
    run_cli(["fit", "--config", str(fast_teacher_config(full_dir / "c.yaml", max_steps))], cwd=full_dir)

    config = fast_teacher_config(killed_dir / "c.yaml", 10_000)
    proc = start_cli(["fit", "--config", str(config)], cwd=killed_dir)
    ckpt_dir = killed_dir / "runs/tiny/teacher/checkpoints"
    deadline = time.time() + 240
    while last_saved_step(ckpt_dir / "last.ckpt") < 4:  # Lightning replaces last.ckpt atomically
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert time.time() < deadline, "no checkpoint written in time"
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    saved = last_saved_step(ckpt_dir / "last.ckpt")
    assert 4 <= saved < max_steps

    run_cli(["fit", "--config", str(fast_teacher_config(killed_dir / "c.yaml", max_steps)),
             "--ckpt_path", "last"], cwd=killed_dir)
    final = torch.load(ckpt_dir / "last.ckpt", map_location="cpu", weights_only=True)
    assert final["global_step"] == max_steps
    resumed_version = sorted((killed_dir / "runs/tiny/teacher").glob("version_*"))[-1]
    resumed = scalar_events(resumed_version, "train/loss")
    assert sorted(resumed) == list(range(saved, max_steps))  # continued, did not restart
    full = scalar_events(full_dir / "runs/tiny/teacher", "train/loss")
    for step, value in resumed.items():
        assert value == pytest.approx(full[step], rel=1e-5, abs=1e-6), step
