"""One writer per output folder: the lock file of pair generation."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

import pytest

from distill_pl.data.folder_lock import FolderLock, FolderLockedError
from tests.cli_helpers import DISTILL_PL, REPO, cli_env, edited_config


def test_a_second_writer_fails_naming_the_holder(tmp_path):
    lock = FolderLock(tmp_path / "pairs").acquire()
    holder = json.loads(lock.path.read_text())
    assert holder["host"] == socket.gethostname()
    child = f"from distill_pl.data.folder_lock import FolderLock; FolderLock({str(tmp_path / 'pairs')!r}).acquire()"
    proc = subprocess.run([sys.executable, "-c", child], env=cli_env(), capture_output=True, text=True)
    assert proc.returncode != 0
    assert f"being written by pid {holder['pid']} on host {holder['host']}" in proc.stderr
    FolderLock(tmp_path / "pairs", rank=1).acquire().release()  # another rank's lock is its own
    lock.release()
    assert not lock.path.exists()
    FolderLock(tmp_path / "pairs").acquire()  # free again


def test_a_stale_lock_is_taken_over_but_another_hosts_is_not(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    path = tmp_path / ".lock.rank0"
    path.write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname(), "since": "earlier"}))
    with pytest.warns(UserWarning, match="taking over a stale lock"):
        lock = FolderLock(tmp_path).acquire()
    lock.release()
    path.write_text(json.dumps({"pid": int(dead.stdout), "host": "elsewhere", "since": "earlier"}))
    with pytest.raises(FolderLockedError, match=f"pid {int(dead.stdout)} on host elsewhere"):
        FolderLock(tmp_path).acquire()


def test_pair_generation_on_a_locked_folder_fails_at_once(tmp_path):
    lock = FolderLock(tmp_path / "runs/tiny/kd_pairs/train").acquire()  # held by this (live) process
    config = edited_config("configs/tiny/kd_pairs.yaml", tmp_path / "pairs.yaml",
                           lambda cfg: cfg["model"]["init_args"].update(teacher=str(REPO / "teachers/tiny")))
    started = time.time()
    proc = subprocess.run(DISTILL_PL + ["predict", "--config", str(config)], cwd=tmp_path, env=cli_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert f"FolderLockedError: runs/tiny/kd_pairs/train is being written by pid {lock_pid(lock)}" in proc.stderr
    assert not list((tmp_path / "runs/tiny/kd_pairs").rglob("shard_*"))
    assert time.time() - started < 120  # before any generation
    lock.release()


def lock_pid(lock: FolderLock) -> int:
    return json.loads(lock.path.read_text())["pid"]


