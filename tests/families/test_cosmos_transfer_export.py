"""The exported student pipeline loads with Cosmos2_5_TransferPipeline and reproduces x_g."""

from __future__ import annotations

import json

import pytest
import torch

from diffusers.schedulers import scheduling_flow_match_euler_discrete as euler_module

from distill_pl.diffusion.sampling import few_step_sample, one_step_sample
from distill_pl.models.autoencoder import WanVAE
from distill_pl.models.conditioning import Conditioning
from distill_pl.families.cosmos_transfer.adapter import CosmosTransferDenoiser
from distill_pl.families.cosmos_transfer.export import save_cosmos_student_pipeline
from distill_pl.models.guidance import velocity_fn
from distill_pl.models.loading import ModelFolderError
from tests.families import cosmos_tiny
from tests.families.test_cosmos_transfer import make_inputs, run_pipeline


@pytest.fixture(scope="module")
def teacher_folder(cosmos_pipeline_folder, one_thread):
    return cosmos_pipeline_folder


def test_student_pipeline_reproduces_one_step_output(teacher_folder, tmp_path):
    student = CosmosTransferDenoiser(path=str(teacher_folder), control_scale=0.5)
    with torch.no_grad():  # a student that differs from the teacher
        for p in student.parameters():
            p.add_(0.01 * torch.randn_like(p))
    out = save_cosmos_student_pipeline(tmp_path / "student", student.eval(), teacher_folder)

    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "Cosmos2_5_TransferPipeline"
    assert index["scheduler"] == ["diffusers", "FlowMatchEulerDiscreteScheduler"]
    assert {"vae", "text_encoder", "tokenizer", "transformer", "controlnet", "scheduler"} <= {
        p.name for p in out.iterdir()
    }
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left

    pipe = cosmos_tiny.load_pipeline(out)
    pipe.set_progress_bar_config(disable=True)
    noise, prompt, negative, control = make_inputs(seed=2)
    expected, _ = run_pipeline(pipe, noise, prompt, negative, control, 1, 1.0, 0.5)

    cond = Conditioning(prompt, None, student.encode_control(control, WanVAE(str(out))))
    with torch.no_grad():
        x_g = one_step_sample(velocity_fn(student, cond), noise.clone())
    assert expected.shape == x_g.shape
    torch.testing.assert_close(expected, x_g, rtol=0, atol=2e-6)
    teacher = CosmosTransferDenoiser(path=str(teacher_folder), control_scale=0.5).eval()
    with torch.no_grad():
        assert (one_step_sample(velocity_fn(teacher, cond), noise.clone()) - expected).abs().max() > 1e-3


def test_four_step_student_pipeline_reproduces_few_step_output(teacher_folder, tmp_path, monkeypatch):
    """A 4-step student (levels 1, 0.75, 0.5, 0.25) exports as a pipeline that, called with
    num_inference_steps=4 and no CFG, equals few_step_sample with the pipeline's own re-noise
    draws (recorded from the scheduler's randn_tensor; they come from torch's global RNG)."""
    levels = [1.0, 0.75, 0.5, 0.25]
    student = CosmosTransferDenoiser(path=str(teacher_folder), control_scale=0.5)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.01 * torch.randn_like(p))
    out = save_cosmos_student_pipeline(tmp_path / "student", student.eval(), teacher_folder, noise_levels=levels)
    config = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert config["_class_name"] == "FlowMatchEulerDiscreteScheduler"
    assert config["stochastic_sampling"] and config["shift_terminal"] == 0.25

    draws = []
    randn = euler_module.randn_tensor
    monkeypatch.setattr(euler_module, "randn_tensor", lambda *a, **k: draws.append(randn(*a, **k)) or draws[-1])
    pipe = cosmos_tiny.load_pipeline(out)
    pipe.set_progress_bar_config(disable=True)
    noise, prompt, negative, control = make_inputs(seed=3)
    torch.manual_seed(7)
    expected, _ = run_pipeline(pipe, noise, prompt, negative, control, 4, 1.0, 0.5)
    assert len(draws) == 4  # one per step; the last is multiplied by the final sigma 0
    torch.manual_seed(7)
    again, _ = run_pipeline(pipe, noise, prompt, negative, control, 4, 1.0, 0.5)
    torch.testing.assert_close(again, expected, rtol=0, atol=0)  # the global seed fixes the draws

    cond = Conditioning(prompt, None, student.encode_control(control, WanVAE(str(out))))
    with torch.no_grad():
        x = few_step_sample(velocity_fn(student, cond), noise.clone(), levels, renoise=draws[:3])
        other = few_step_sample(velocity_fn(student, cond), noise.clone(), levels, renoise=[torch.randn_like(noise) for _ in range(3)])
    assert expected.shape == x.shape
    torch.testing.assert_close(expected, x, rtol=0, atol=1e-5)  # 3.6e-7 seen on 2026-12-05
    assert (other - expected).abs().max() > 1e-2  # other re-noise draws give another sample


def test_ladder_the_pipeline_cannot_run_is_refused(teacher_folder, tmp_path):
    student = CosmosTransferDenoiser(path=str(teacher_folder))
    with pytest.raises(ValueError, match=r"noise levels \[1.0, 0.9, 0.5, 0.1\] from set_timesteps\(4\)"):
        save_cosmos_student_pipeline(tmp_path / "student", student, teacher_folder, noise_levels=[1.0, 0.9, 0.5, 0.1])
    assert not list(tmp_path.iterdir())


def test_bad_folders(teacher_folder, tmp_path):
    student = CosmosTransferDenoiser(path=str(teacher_folder))
    (tmp_path / "taken").mkdir()
    with pytest.raises(FileExistsError, match=rf"{tmp_path / 'taken'}: already exists"):
        save_cosmos_student_pipeline(tmp_path / "taken", student, teacher_folder)
    with pytest.raises(ModelFolderError, match=rf"{teacher_folder / 'transformer'}: no model_index.json"):
        save_cosmos_student_pipeline(tmp_path / "new", student, teacher_folder / "transformer")
    assert not (tmp_path / "new").exists()
