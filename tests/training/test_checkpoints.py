"""Checkpoint files: atomic and loud saves (AtomicCheckpointIO), and what ``--ckpt_path last`` resumes."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

from distill_pl.training.checkpoint_io import AtomicCheckpointIO, CheckpointSaveError
from distill_pl.training.resume import NoCheckpointError, resume_checkpoint
from tests.cli_helpers import DISTILL_PL, cli_env, run_cli, scalar_events
from tests.training.test_teacher_cli import fast_teacher_config


def save(path: Path, step: int, size: int = 10) -> Path:
    AtomicCheckpointIO().save_checkpoint({"global_step": step, "w": torch.full((size,), float(step))}, path)
    return path


def truncate(path: Path, fraction: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])


def test_last_is_the_newest_intact_checkpoint_by_step(tmp_path):
    save(tmp_path / "last.ckpt", 6)
    save(tmp_path / "epoch=0-step=3.ckpt", 3)
    save(tmp_path / "last-v1.ckpt", 9)  # Lightning's versioned "last" of a later run
    assert resume_checkpoint([tmp_path]) == str(tmp_path / "last-v1.ckpt")

    truncate(tmp_path / "last-v1.ckpt")  # a torn newest file: fall back, say so
    with pytest.warns(UserWarning, match=r"newest checkpoint .*last-v1.ckpt cannot be read .* resuming from "
                                         r".*last.ckpt \(step 6\)"):
        assert resume_checkpoint([tmp_path]) == str(tmp_path / "last.ckpt")


def test_no_usable_checkpoint_is_an_error_unless_a_fresh_start_is_asked_for(tmp_path):
    with pytest.raises(NoCheckpointError, match="no usable checkpoint in .*none there.*last_or_fresh"):
        resume_checkpoint([tmp_path / "missing"])
    truncate(save(tmp_path / "last.ckpt", 2))
    with pytest.raises(NoCheckpointError, match="last.ckpt: RuntimeError"):
        resume_checkpoint([tmp_path])
    with pytest.warns(UserWarning, match="starting a new run"):
        assert resume_checkpoint([tmp_path], allow_fresh=True) is None


CHILD = textwrap.dedent("""
    import io, sys, time, torch
    from distill_pl.training import checkpoint_io

    path = sys.argv[1]
    checkpoint_io.atomic_torch_save({"global_step": 1, "w": torch.ones(10)}, path)
    real_save = torch.save

    def slow_save(obj, file, *args, **kwargs):  # a slow disk: half the bytes, then a long wait
        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        data = buffer.getvalue()
        file.write(data[: len(data) // 2])
        file.flush()
        print("writing", flush=True)
        time.sleep(120)
        file.write(data[len(data) // 2:])

    torch.save = slow_save
    checkpoint_io.AtomicCheckpointIO().save_checkpoint({"global_step": 2, "w": torch.ones(1_000_000)}, path)
""")


def test_sigkill_during_a_slow_save_leaves_the_previous_checkpoint_loadable(tmp_path):
    path = tmp_path / "checkpoints" / "last.ckpt"
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(path)], env=cli_env(), cwd=tmp_path,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "writing", child.stderr.read()
        child.send_signal(signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
    assert torch.load(path, map_location="cpu", weights_only=True)["global_step"] == 1
    stale = list(path.parent.glob(".last.ckpt.*"))
    assert stale  # the killed save's temp file, beside the checkpoint
    save(path, 3)  # the next save removes it
    assert not list(path.parent.glob(".last.ckpt.*"))
    assert torch.load(path, map_location="cpu", weights_only=True)["global_step"] == 3


def test_a_failing_save_raises_with_the_path_and_the_os_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(CheckpointSaveError, match=f"cannot write checkpoint {blocker}/last.ckpt: .*Errno"):
        save(blocker / "last.ckpt", 1)


@pytest.fixture
def immutable(tmp_path):
    """A folder nobody (not even root) can write to (``chattr +i``)."""
    folder = tmp_path / "runs/tiny/teacher/checkpoints"
    folder.mkdir(parents=True)
    if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(folder)]).returncode != 0:
        pytest.skip("chattr +i is not available here")
    yield folder
    subprocess.run(["chattr", "-i", str(folder)])


@pytest.mark.slow  # 17 s (2026-12-07)
def test_unwritable_checkpoint_folder_fails_the_run_with_the_path(tmp_path, immutable):
    config = fast_teacher_config(tmp_path / "teacher.yaml", max_steps=2)
    proc = subprocess.run(DISTILL_PL + ["fit", "--config", str(config)], cwd=tmp_path, env=cli_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert f"CheckpointSaveError: cannot write checkpoint {immutable}" in proc.stderr.replace("\n", " "), \
        proc.stderr[-3000:]
    assert "Operation not permitted" in proc.stderr


@pytest.mark.slow  # two runs of the teacher config (about 1.5 min on a loaded 2-core machine)
def test_corrupt_newest_checkpoint_resumes_from_the_previous_one(tmp_path):
    config = fast_teacher_config(tmp_path / "teacher.yaml", max_steps=4)
    cfg = yaml.safe_load(config.read_text())
    cfg["trainer"]["callbacks"][0]["init_args"]["save_top_k"] = -1  # keep every step's checkpoint
    config.write_text(yaml.safe_dump(cfg, sort_keys=False))
    run_cli(["fit", "--config", str(config)], cwd=tmp_path)
    folder = tmp_path / "runs/tiny/teacher/checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["epoch=0-step=2.ckpt", "epoch=1-step=4.ckpt", "last.ckpt"]
    truncate(folder / "last.ckpt")
    truncate(folder / "epoch=1-step=4.ckpt")
    (folder / "last.ckpt").touch()  # the newest file

    proc = run_cli(["fit", "--config", str(config), "--ckpt_path", "last"], cwd=tmp_path)
    relative = Path("runs/tiny/teacher/checkpoints")  # as the config names it
    assert f"the newest checkpoint {relative / 'last.ckpt'} cannot be read" in proc.stderr.replace("\n", " ")
    assert f"resuming from {relative / 'epoch=0-step=2.ckpt'} (step 2)" in proc.stderr.replace("\n", " ")
    resumed = scalar_events(sorted((tmp_path / "runs/tiny/teacher").glob("version_*"))[-1], "train/loss")
    assert sorted(resumed) == [2, 3]
    newest = resume_checkpoint([folder])  # the torn last.ckpt is still there, beside Lightning's last-v1.ckpt
    assert torch.load(newest, map_location="cpu", weights_only=True)["global_step"] == 4


@pytest.mark.slow
def test_ckpt_path_last_without_a_checkpoint_exits_unless_fresh_is_asked(tmp_path):
    config = fast_teacher_config(tmp_path / "teacher.yaml", max_steps=1)
    proc = subprocess.run(DISTILL_PL + ["fit", "--config", str(config), "--ckpt_path", "last"], cwd=tmp_path,
                          env=cli_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "distill-pl: --ckpt_path last: no usable checkpoint in runs/tiny/teacher/checkpoints" in proc.stderr
    run_cli(["fit", "--config", str(config), "--ckpt_path", "last_or_fresh"], cwd=tmp_path)
    assert (tmp_path / "runs/tiny/teacher/checkpoints/last.ckpt").is_file()


def _full_disk_open(monkeypatch, after: int = 1000):
    """``open`` of distill_pl.training.checkpoint_io: files that fail with ENOSPC after
    ``after`` bytes (torch then raises RuntimeError "... unexpected pos ...")."""
    import errno
    import io

    from distill_pl.training import checkpoint_io

    class FullDisk(io.FileIO):
        def write(self, data):
            self.written = getattr(self, "written", 0) + len(data)
            if self.written > after:
                raise OSError(errno.ENOSPC, "No space left on device")
            return super().write(data)

    monkeypatch.setattr(checkpoint_io, "open", lambda path, mode="r": FullDisk(path, mode), raising=False)


def test_a_full_disk_during_a_save_is_a_checkpoint_save_error(tmp_path, monkeypatch):
    save(tmp_path / "last.ckpt", 1)
    _full_disk_open(monkeypatch)
    with pytest.raises(CheckpointSaveError, match=f"cannot write checkpoint {tmp_path}/last.ckpt: "
                                                  r"\[Errno 28\] No space left on device"):
        save(tmp_path / "last.ckpt", 2, size=10_000)
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)["global_step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temp file left


def test_a_full_disk_during_a_fit_ends_in_one_line(tmp_path, monkeypatch, capsys):
    from distill_pl.cli.main import main

    monkeypatch.chdir(tmp_path)
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        config = fast_teacher_config(tmp_path / "teacher.yaml", max_steps=2)
        _full_disk_open(monkeypatch)
        with pytest.raises(SystemExit) as exit_:
            main(["fit", "--config", str(config), "--data.cache_dir", "cache"])
    finally:
        torch.set_num_threads(torch_threads)
    assert exit_.value.code == 1
    err = [line for line in capsys.readouterr().err.strip().splitlines() if "Loading weights" not in line]
    assert len(err) <= 3, err
    assert "error: CheckpointSaveError: cannot write checkpoint " in err[0], err
    assert "No space left on device" in err[0], err


def _bad_checkpoints(folder: Path) -> dict[str, tuple[Path, str]]:
    """name -> (a file or folder that is no readable checkpoint, what the error says)."""
    folder.mkdir()
    (folder / "random.ckpt").write_bytes(bytes(range(256)) * 40)
    (folder / "notes.ckpt").write_text("step: 4\nloss: 0.1\n")
    truncate(save(folder / "torn.ckpt", 4, size=10_000))
    torch.save(torch.ones(3), folder / "tensor.pt")
    (folder / "sharded").mkdir()
    (folder / "sharded" / "__0_0.distcp").write_bytes(b"\0" * 64)
    return {"random": (folder / "random.ckpt", "not a PyTorch checkpoint"),
            "text": (folder / "notes.ckpt", "not a PyTorch checkpoint"),
            "truncated": (folder / "torn.ckpt", "a truncated or torn checkpoint"),
            "folder without meta.pt": (folder / "sharded", "a folder without meta.pt"),
            "a tensor": (folder / "tensor.pt", "a torch file holding a Tensor, not a Lightning checkpoint")}


@pytest.mark.parametrize("command", ["fit", "export"])
def test_an_unreadable_checkpoint_is_one_line_naming_it(tmp_path, monkeypatch, capsys, command):
    """--ckpt_path (fit) and --ckpt (export) on random bytes, a text file, a truncated
    checkpoint and a folder without meta.pt: exit 1, one line naming the file, no advice
    about weights_only, before any model loads."""
    from distill_pl.cli.main import main

    monkeypatch.chdir(tmp_path)
    config = fast_teacher_config(tmp_path / "teacher.yaml", max_steps=2)
    for name, (bad, says) in _bad_checkpoints(tmp_path / "bad").items():
        args = (["fit", "--config", str(config), "--ckpt_path", str(bad)] if command == "fit"
                else ["export", "--ckpt", str(bad), "--out", str(tmp_path / "out")])
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_:
            main(args)
        err = capsys.readouterr().err.strip().splitlines()
        assert exit_.value.code == 1, (name, err)
        assert len(err) <= 3 and str(bad) in err[0] and says in err[0], (name, err)
        assert "weights_only" not in "\n".join(err), (name, err)
    assert not (tmp_path / "runs").exists() and not (tmp_path / "out").exists()
