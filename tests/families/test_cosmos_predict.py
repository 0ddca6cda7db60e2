"""CosmosPredictDenoiser against diffusers' Cosmos2_5_PredictBasePipeline (tiny random
components, float32): text-to-world and video-to-world (1 and 2 conditional latent frames),
the registry's pick by pipeline class, and the student export."""

from __future__ import annotations

import json

import pytest
import torch

from distill_pl.diffusion.flow import cosmos_guidance_to_w
from distill_pl.diffusion.sampling import one_step_sample, sample_with_scheduler
from distill_pl.export.model_folders import load_scheduler
from distill_pl.families.cosmos_transfer.chunks import pad_or_trim
from distill_pl.families.cosmos_transfer.predict import CosmosPredictDenoiser
from distill_pl.families.registry import folder_class_name, load_denoiser, transformer_folder
from distill_pl.models.autoencoder import WanVAE
from distill_pl.models.conditioning import Conditioning
from distill_pl.models.guidance import negative_conditioning, sampling_velocity_fn
from tests.families import cosmos_tiny

FRAMES, HEIGHT, WIDTH = 9, 32, 32  # 3 latent frames of 4 x 4
#: max |project - pipeline| of a 3-step CFG sample (values up to ~5): float32 rounding of the
#: batched u + w (c - u) against the pipeline's two calls and c + g (c - u), and of its
#: (z - mean) * (1 / std) against the project's (z - mean) / std
PARITY_ATOL = 1e-5


@pytest.fixture(scope="module")
def predict_folder(tmp_path_factory, one_thread):
    folder = tmp_path_factory.mktemp("cosmos_predict") / "pipeline"
    cosmos_tiny.save_tiny_predict_pipeline(folder)
    return folder


@pytest.fixture(scope="module")
def pipeline(predict_folder):
    pipe = cosmos_tiny.load_predict_pipeline(predict_folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def make_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(1, cosmos_tiny.LATENT_CHANNELS, 3, 4, 4, generator=g)
    prompt = torch.randn(1, 6, cosmos_tiny.TEXT_DIM, generator=g)
    negative = torch.randn(1, 6, cosmos_tiny.TEXT_DIM, generator=g)
    video = torch.rand(1, 3, 7, HEIGHT, WIDTH, generator=g) * 2 - 1  # an input clip in [-1, 1]
    return noise, prompt, negative, video


def run_pipeline(pipe, noise, prompt, negative, steps, guidance_scale, video=None, conditional_frames=2):
    """The pipeline's latents; ``video`` [1, 3, T, H, W] in [-1, 1] (video-to-world) goes in as
    the tensor form the pipeline takes without preprocessing."""
    return pipe(
        video=video, prompt_embeds=prompt, negative_prompt_embeds=negative, height=HEIGHT, width=WIDTH,
        num_frames=FRAMES, num_inference_steps=steps, guidance_scale=guidance_scale, latents=noise.clone(),
        num_latent_conditional_frames=conditional_frames, output_type="latent",
    ).frames


def world_conditioning(prompt, video, conditional_frames, vae):
    """The project's video-to-world conditioning: the clip's last ``4 (n - 1) + 1`` frames,
    padded with the last one to the output length, encoded; its first n latent frames given."""
    if video is None:
        return Conditioning(prompt)
    clip = pad_or_trim(video[:, :, -(4 * (conditional_frames - 1) + 1):], FRAMES)
    return Conditioning(prompt, None, None, vae.encode(clip), torch.tensor([conditional_frames]))


@pytest.mark.parametrize("conditional_frames, with_video", [(0, False), (1, True), (2, True)])
def test_cfg_sample_equals_pipeline(predict_folder, pipeline, conditional_frames, with_video):
    noise, prompt, negative, video = make_inputs()
    video = video if with_video else None
    g = 3.0
    expected = run_pipeline(pipeline, noise, prompt, negative, 3, g, video, max(conditional_frames, 1))

    teacher = CosmosPredictDenoiser(path=str(predict_folder)).eval()
    cond = world_conditioning(prompt, video, conditional_frames, WanVAE(str(predict_folder)))
    fn = sampling_velocity_fn(teacher, noise, cond, negative_conditioning(cond, negative, None),
                              cosmos_guidance_to_w(g))
    sample = sample_with_scheduler(fn, noise.clone(), load_scheduler(str(predict_folder)), 3)
    assert sample.shape == expected.shape == (1, 16, 3, 4, 4)
    assert (sample - expected).abs().max() < PARITY_ATOL
    if with_video:  # the given frames condition the rest
        alone = run_pipeline(pipeline, noise, prompt, negative, 3, g)
        assert (alone[:, :, -1] - expected[:, :, -1]).abs().max() > 100 * PARITY_ATOL


def test_registry_picks_predict_by_its_pipeline_class(predict_folder, cosmos_pipeline_folder):
    assert folder_class_name(predict_folder) == "Cosmos2_5_PredictBasePipeline"
    assert folder_class_name(cosmos_pipeline_folder) == "CosmosTransformer3DModel"
    denoiser = load_denoiser(predict_folder, conditional_frame_timestep=0.01)
    assert type(denoiser) is CosmosPredictDenoiser
    assert denoiser.adapter_options == {"conditional_frame_timestep": 0.01}
    assert (denoiser.latent_channels, denoiser.control_channels, denoiser.text_dim) == (16, 0, cosmos_tiny.TEXT_DIM)
    assert transformer_folder(predict_folder) == predict_folder / "transformer"
    x_t, text = torch.zeros(1, 16, 3, 4, 4), torch.zeros(1, 5, cosmos_tiny.TEXT_DIM)
    with pytest.raises(ValueError, match="Cosmos-Predict2.5 takes no control"):
        denoiser(x_t, torch.ones(1), Conditioning(text, None, x_t))


def test_exported_student_equals_project_one_step(predict_folder, tmp_path):
    student = CosmosPredictDenoiser(path=str(predict_folder))
    with torch.no_grad():  # a student that differs from the teacher
        for p in student.parameters():
            p.add_(0.01 * torch.randn_like(p))
    out = student.eval().save_student_pipeline(str(tmp_path / "student"), str(predict_folder), shift=1.0)
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "Cosmos2_5_PredictBasePipeline"
    assert index["scheduler"] == ["diffusers", "FlowMatchEulerDiscreteScheduler"]
    pipe = cosmos_tiny.load_predict_pipeline(out)
    pipe.set_progress_bar_config(disable=True)
    noise, prompt, negative, video = make_inputs(seed=1)
    expected = run_pipeline(pipe, noise, prompt, negative, 1, 1.0, video, 1)

    cond = world_conditioning(prompt, video, 1, WanVAE(str(out)))
    with torch.no_grad():
        x_g = one_step_sample(sampling_velocity_fn(student, noise, cond), noise.clone())
    torch.testing.assert_close(x_g, expected, rtol=0, atol=1e-5)
    assert type(load_denoiser(out)) is CosmosPredictDenoiser


def test_real_size_2b_on_meta():
    from distill_pl.families.cosmos_transfer.configs import COSMOS_PREDICT_2_5_2B
    from distill_pl.families.registry import build_denoiser

    denoiser = build_denoiser("Cosmos2_5_PredictBasePipeline", COSMOS_PREDICT_2_5_2B, dtype="bfloat16", on_meta=True)
    assert type(denoiser) is CosmosPredictDenoiser and all(p.is_meta for p in denoiser.parameters())
    assert (denoiser.num_blocks, denoiser.feature_dim, denoiser.text_dim) == (28, 2048, 100352)
    # Transfer2.5-2B's base (2.41 B) without its image-context projections: 2.06 B
    assert sum(p.numel() for p in denoiser.parameters()) == 2_059_174_912
