"""configs/tiny/dmd2.yaml with ``model.context_parallel: {ulysses: 2}`` on 2 CPU processes
(``FSDP2Strategy``, gloo) through the real ``distill-pl`` command: one context-parallel group,
data-parallel size 1, so both ranks read the same batches (the samplers split by the
data-parallel rank) and must log the single process's losses step by step and export its
student, also when the run is killed after its step-5 checkpoint and resumed.

Slow (each run starts its processes): deselected by default, run with ``-m slow``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.training.test_dmd2 import teacher_dir  # noqa: F401
from tests.training.test_dmd2_fsdp import EXPORT, losses
from tests.training.test_dmd2_fsdp import config as fsdp_config

pytestmark = pytest.mark.slow


def config(work: Path, teacher: Path, devices: int, kill_at: int | None = None) -> Path:
    """test_dmd2_fsdp's 10-step config with batches of 2, split over the tokens on 2 devices."""
    path = fsdp_config(work, teacher, devices, batch_size=2, micro=1, kill_at=kill_at)
    if devices > 1:
        cfg = yaml.safe_load(path.read_text())
        cfg["model"]["init_args"]["context_parallel"] = {"ulysses": devices}
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def test_killed_context_parallel_run_gives_the_losses_and_student_of_one_process(teacher_dir, tmp_path):
    """Ulysses 2, killed at step 5 (after the first student step's checkpoint) and resumed with
    --ckpt_path last, vs one process on the same batches: every step's critic or generator loss
    on both ranks (steps 0..4 from the killed run, 5..9 from the resumed one) equals the single
    process's (rel 1e-4), and so does the exported EMA student (atol 1e-5)."""
    from tests.cli_helpers import run_cli, start_cli

    single, split = tmp_path / "single", tmp_path / "split"
    single.mkdir(), split.mkdir()
    run_cli(["fit", "--config", str(config(single, teacher_dir, devices=1))], cwd=single)
    proc = start_cli(["fit", "--config", str(config(split, teacher_dir, 2, kill_at=5))], cwd=split)
    assert proc.wait(timeout=300) == -9, proc.stderr.read().decode()[-3000:]
    assert sorted(losses(split)[0]) == list(range(5))
    run_cli(["fit", "--config", str(config(split, teacher_dir, 2)), "--ckpt_path", "last"], cwd=split)
    one, two = losses(single), losses(split)
    assert sorted(two) == [0, 1] and sorted(one[0]) == sorted(two[0]) == sorted(two[1]) == list(range(10))
    for step, loss in one[0].items():
        for rank in (0, 1):
            assert two[rank][step] == pytest.approx(loss, rel=1e-4), (rank, step)
    a, b = load_file(single / EXPORT), load_file(split / EXPORT)
    assert a.keys() == b.keys()
    for key, value in a.items():
        torch.testing.assert_close(b[key], value, rtol=0, atol=1e-5, msg=key)
