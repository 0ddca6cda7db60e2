"""DMD2 with ``model.context_parallel: {ulysses: 2}`` on CPU processes (``FSDP2Strategy``, gloo)
through the real ``distill-pl`` command, against one process on the same batches.

- configs/tiny/dmd2.yaml (Wan 2.1) on 2 processes: one context-parallel group, data-parallel
  size 1, so both ranks read the same batches (the samplers split by the data-parallel rank)
  and must log the single process's losses step by step and export its student, also when the
  run is killed after its step-5 checkpoint and resumed.
- configs/tiny-cosmos-transfer2.5/dmd2.yaml (base + ControlNet, conditional frames drawn as the
  config does) on 2 processes, one group; configs/tiny-wan2.2-t2v-a14b/dmd2.yaml (two experts)
  on 4 processes, 2 data-parallel ranks x Ulysses 2, whose ranks route their own samples to
  the experts: 5 steps (4 critic, 1 student) each.

Slow (each run starts its processes): deselected by default, run with ``-m slow``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.cli_helpers import edited_config, run_cli
from tests.families import cosmos_tiny
from tests.families.wan22_tiny import write_tiny_wan22
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


#: family -> (config folder, runs folder, teacher writer, processes, data settings, the
#: exported pipeline's trained networks)
FAMILIES = {
    "cosmos-transfer2.5": ("configs/tiny-cosmos-transfer2.5", "runs/tiny-cosmos-transfer2.5",
                           cosmos_tiny.write_tiny_cosmos_transfer, 2, {}, {"transformer", "controlnet"}),
    "wan2.2-t2v-a14b": ("configs/tiny-wan2.2-t2v-a14b", "runs/tiny-wan2.2-t2v-a14b",
                        lambda folder: write_tiny_wan22(folder, "t2v-a14b"), 4,
                        {"num_frames": 5, "max_text_length": 8}, {"transformer", "transformer_2"}),
}
ULYSSES = 2
BATCH = 2  # per data-parallel rank


def family_config(work: Path, family: str, split: bool) -> Path:
    """The family's tiny DMD2 config for 5 steps from the teacher's weights (a checkpoint at
    step 5): ``split``, on the family's processes with Ulysses 2 and FSDP2, ``BATCH`` clips per
    data-parallel rank; else one process with the global batch."""
    configs, _, _, family_processes, data, _ = FAMILIES[family]
    processes = family_processes if split else 1

    def edit(cfg):
        t = cfg["trainer"]
        t.update(devices=processes, max_steps=5)
        t["callbacks"][0]["init_args"]["every_n_train_steps"] = 5
        t["callbacks"][1]["init_args"]["every_n_steps"] = 5
        t["callbacks"].append({"class_path": "tests.training.test_dmd2_fsdp.StepLossRecorder"})
        init = cfg["model"]["init_args"]
        init.update(init_from=None, discriminator_hidden=8, student_lr=1e-3, fake_score_lr=1e-3,
                    discriminator_lr=1e-3)
        if split:
            t["strategy"] = {"class_path": "distill_pl.training.strategies.FSDP2Strategy"}
            init["context_parallel"] = {"ulysses": ULYSSES}
        batch = BATCH if split else BATCH * family_processes // ULYSSES
        cfg["data"].update(batch_size=batch, val_batch_size=batch, samples_per_epoch=8, **data)

    return edited_config(f"{configs}/dmd2.yaml", work / "dmd2.yaml", edit)


def exported(export: Path) -> dict[str, torch.Tensor]:
    """Every network of an exported student pipeline folder, keyed ``<subfolder>.<name>``."""
    weights = {}
    for file in sorted(export.glob("*/*.safetensors")):
        weights.update({f"{file.parent.name}.{k}": v for k, v in load_file(file).items()})
    return weights


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_context_parallel_run_gives_the_losses_and_student_of_one_process(family, tmp_path):
    """Ulysses 2 on ``processes`` (2: one group; 4: 2 data-parallel ranks x Ulysses 2, each rank
    ``BATCH`` clips) vs one process with the global batch: the ranks of a group log the same
    losses (rel 1e-6), the mean over the data-parallel ranks is the single process's loss at
    every step (rel 1e-4), and the exported students agree (atol 1e-5)."""
    _, runs, write_teacher, processes, _, trained = FAMILIES[family]
    single, split = tmp_path / "single", tmp_path / "split"
    write_teacher(single / runs / "teacher")
    run_cli(["fit", "--config", str(family_config(single, family, split=False))], cwd=single, timeout=600)
    for name in (f"{runs}/teacher", "runs/cache"):  # the prompt embeddings cached by the first run
        shutil.copytree(single / name, split / name, symlinks=True)
    run_cli(["fit", "--config", str(family_config(split, family, split=True))], cwd=split, timeout=600)

    one, many = losses(single), losses(split)
    assert sorted(one) == [0] and sorted(one[0]) == list(range(5)) and sorted(many) == list(range(processes))
    for step, loss in one[0].items():
        groups = [[many[rank][step] for rank in range(start, start + ULYSSES)]
                  for start in range(0, processes, ULYSSES)]
        for group in groups:
            assert group[1] == pytest.approx(group[0], rel=1e-6), (step, group)
        assert sum(g[0] for g in groups) / len(groups) == pytest.approx(loss, rel=1e-4), step
    a, b = exported(single / runs / "dmd2/export"), exported(split / runs / "dmd2/export")
    assert a.keys() == b.keys() and trained <= {key.split(".")[0] for key in a}
    for key, value in a.items():
        torch.testing.assert_close(b[key], value, rtol=0, atol=1e-5, msg=key)
