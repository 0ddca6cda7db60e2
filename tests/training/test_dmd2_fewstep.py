"""DMD2Module with a 4-step student: each trained-step input option and Phased DMD run through
a Trainer, log finite losses, and export the student's noise levels; configs/tiny/dmd2_4step.yaml
through the real CLI."""

from __future__ import annotations

import json
import math

import pytest

from distill_pl.diffusion.student_steps import student_noise_levels
from distill_pl.export.model_folders import student_noise_levels_of
from distill_pl.training.dmd2 import DMD2Module
from tests.training.test_dmd2 import FAST, StepRecorder, dm, kd_checkpoint, teacher_dir, tiny_config, trainer  # noqa: F401 (fixtures)

pytestmark = pytest.mark.usefixtures("one_thread")
SIGMAS = [1.0, 0.75, 0.5, 0.25]


@pytest.mark.parametrize("options", [
    dict(trained_step_input="backward_simulation"),
    dict(trained_step_input="noised_real"),
    dict(phased_dmd=True, phase_generator_steps=1),
], ids=["backward_simulation", "noised_real", "phased"])
def test_four_step_student_trains_and_exports_its_levels(teacher_dir, dm, tmp_path, options):
    module = DMD2Module(str(teacher_dir), student_sigmas=SIGMAS, student_update_freq=2,
                        export_dir=str(tmp_path / "export"), **FAST, **options)
    levels = student_noise_levels(SIGMAS, 2.0, shifted=False)  # the teacher's shift is 2
    assert module.student_levels == levels
    recorder = StepRecorder()
    trainer(6, callbacks=[recorder]).fit(module, datamodule=dm)
    assert all(math.isfinite(r["loss"]) and not r["skipped"] for r in recorder.rows)
    assert [r["changed"]["student"] for r in recorder.rows] == [False, True] * 3
    steps = json.loads((tmp_path / "export" / "student_steps.json").read_text())
    assert steps["noise_levels"] == pytest.approx(list(levels))
    assert steps["scheduler_sigmas"] == pytest.approx(SIGMAS)
    if options.get("phased_dmd"):  # one generator update per phase, the last phase to the end
        assert [module.dmd_phase(s) for s in range(12)] == [0, 0, 1, 1, 2, 2, 3, 3, 3, 3, 3, 3]


def test_phased_dmd_needs_its_schedule(teacher_dir):
    with pytest.raises(ValueError, match="phase_generator_steps"):
        DMD2Module(str(teacher_dir), student_sigmas=SIGMAS, phased_dmd=True)


@pytest.mark.slow
def test_tiny_4step_config_fits_from_kd_checkpoint_and_exports_4_steps(teacher_dir, kd_checkpoint, tmp_path):
    from tests.cli_helpers import run_cli, scalar_events

    config = tiny_config(tmp_path / "dmd2_4step.yaml", teacher_dir, max_steps=5, source="configs/tiny/dmd2_4step.yaml")
    run_cli(["fit", "--config", str(config), "--model.init_from", str(kd_checkpoint[0])], cwd=tmp_path)
    run_dir = tmp_path / "runs/tiny/dmd2_4step"
    assert sorted(scalar_events(run_dir, "train/generator_loss")) == [4]
    assert list(run_dir.rglob("grids/step000005_0.png"))
    levels = student_noise_levels(SIGMAS, 2.0, shifted=False)
    steps = json.loads((run_dir / "export" / "student_steps.json").read_text())
    assert steps["noise_levels"] == pytest.approx(levels) and steps["sampler"] == "renoise"  # DMD2 re-noises
    # distill-pl export of the checkpoint records the same levels (from its student_sigmas)
    run_cli(["export", "--ckpt", str(run_dir / "checkpoints/last.ckpt"), "--out", str(tmp_path / "exported")],
            cwd=tmp_path)
    assert student_noise_levels_of(tmp_path / "exported") == pytest.approx(levels)
