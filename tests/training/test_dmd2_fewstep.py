"""DMD2Module with a 4-step student: each trained-step input option and Phased DMD (one step per
phase, or two phases of two steps) run through a Trainer, log finite losses, and export the
student's noise levels; Phased DMD at a two-expert student's boundary; configs/tiny/dmd2_4step.yaml
through the real CLI (slow)."""

from __future__ import annotations

import json
import math

import pytest
import torch

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
    dict(phased_dmd=True, phase_generator_steps=1, phase_boundaries=[0.5]),
], ids=["backward_simulation", "noised_real", "phased", "phased_two_phases"])
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
    if options.get("phase_boundaries"):  # two phases at the level written 0.5: steps 0-1 and 2-3
        assert module.phase_boundaries == (levels[2],) and module.objective.phase_steps == [range(2), range(2, 4)]
        assert [module.dmd_phase(s) for s in range(8)] == [0, 0, 1, 1, 1, 1, 1, 1]
    elif options.get("phased_dmd"):  # one generator update per phase, the last phase to the end
        assert [module.dmd_phase(s) for s in range(12)] == [0, 0, 1, 1, 2, 2, 3, 3, 3, 3, 3, 3]


def test_phased_dmd_needs_its_schedule(teacher_dir):
    with pytest.raises(ValueError, match="phase_generator_steps"):
        DMD2Module(str(teacher_dir), student_sigmas=SIGMAS, phased_dmd=True)


def test_phase_boundaries_need_phased_dmd_and_a_two_expert_student_for_experts(teacher_dir):
    with pytest.raises(ValueError, match="phase_boundaries is a setting of Phased DMD"):
        DMD2Module(str(teacher_dir), student_sigmas=SIGMAS, phase_boundaries=[0.5])
    phased = dict(student_sigmas=SIGMAS, phased_dmd=True, phase_generator_steps=1)
    with pytest.raises(ValueError, match=r"phase_boundaries: 'experts' needs a two-expert student"):
        DMD2Module(str(teacher_dir), phase_boundaries="experts", **phased)
    with pytest.raises(ValueError, match=r"phase_boundaries: \[0.6\] not among the student's levels"):
        DMD2Module(str(teacher_dir), phase_boundaries=[0.6], **phased)


def test_phases_at_the_experts_boundary_train_each_experts_steps(dm, tmp_path):
    """A tiny Wan 2.2 T2V-A14B teacher (two experts, boundary 0.875, shift 3) and student:
    ``phase_boundaries: experts`` with levels all on the high-noise expert is refused; with
    ``SIGMAS`` (1, 0.9, 0.75, 0.5 after the shift) the boundary is 0.75, the first level of the
    low-noise expert: the high phase trains steps 0-1 (the high-noise expert's), the low phase
    steps 2-3 (the low-noise expert's, from the student's own chain), and both experts change."""
    from tests.families.wan22_tiny import write_tiny_wan22

    folder = write_tiny_wan22(tmp_path / "a14b", "t2v-a14b")
    phased = dict(phased_dmd=True, phase_generator_steps=1, phase_boundaries="experts", student_update_freq=2)
    with pytest.raises(ValueError, match=r"all run on the high-noise expert.*boundary sigma 0.875"):
        DMD2Module(str(folder), student_sigmas=[1.0, 0.8], **phased)
    module = DMD2Module(str(folder), vae_path=str(folder), student_sigmas=SIGMAS, **FAST, **phased)
    assert module.phase_boundaries == pytest.approx((0.75,)) and module.objective.phase_steps == [range(2), range(2, 4)]
    assert [module.dmd_phase(s) for s in range(6)] == [0, 0, 1, 1, 1, 1]
    student = module.student
    before = {name: [p.detach().clone() for p in expert.parameters()] for name, expert in
              (("high", student.high_noise), ("low", student.low_noise))}
    with_gradient = []  # the levels of the student's calls with gradient
    forward = student.forward

    def spy(x, sigma, cond, feature_block=None):
        if torch.is_grad_enabled():
            with_gradient.append(sigma.tolist())
        return forward(x, sigma, cond, feature_block)

    student.forward = spy
    recorder = StepRecorder()
    trainer(4, callbacks=[recorder]).fit(module, datamodule=dm)
    assert all(math.isfinite(r["loss"]) for r in recorder.rows)
    high_phase, low_phase = with_gradient  # one generator update per phase
    levels = torch.tensor(module.student_levels).tolist()  # as the student is called (float32)
    assert set(high_phase) <= set(levels[:2]) and set(low_phase) <= set(levels[2:])
    changed = {name: any(not torch.equal(a, b) for a, b in zip(params, expert.parameters()))
               for (name, params), expert in zip(before.items(), (student.high_noise, student.low_noise))}
    assert changed == {"high": True, "low": True}


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
