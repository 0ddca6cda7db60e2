"""The project's N-step CFG teacher sample == diffusers' ``WanPipeline`` (float32, tiny random
components saved in the pipeline's own layout and loaded back through the family registry)."""

import pytest
import torch
from diffusers import AutoencoderKLWan, WanPipeline, WanTransformer3DModel

from distill_pl.diffusion.sampling import build_flow_scheduler, sample_with_scheduler
from distill_pl.models.conditioning import Conditioning
from distill_pl.families.registry import folder_class_name, load_denoiser
from distill_pl.models.guidance import velocity_fn
from distill_pl.export.model_folders import load_scheduler

#: max |project - pipeline| over the latents (values of order 1): the only difference left is
#: the batched CFG call (cond and uncond in one forward) against the pipeline's two calls
TOLERANCE = 1e-5
STEPS, GUIDANCE = 6, 5.0
FRAMES, HEIGHT, WIDTH = 9, 32, 32  # latents [1, 4, 3, 4, 4]


def tiny_vae() -> AutoencoderKLWan:
    torch.manual_seed(0)
    return AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                            temperal_downsample=[False, True, True],
                            latents_mean=[0.5, -0.25, 1.0, 0.0], latents_std=[2.0, 0.5, 1.5, 1.0]).eval()


@pytest.fixture(scope="module")
def pipeline_folder(tmp_path_factory):
    torch.manual_seed(0)
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
        text_dim=32, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
    ).eval()
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=tiny_vae(), transformer=transformer,
                       scheduler=build_flow_scheduler("unipc", shift=3.0))
    folder = tmp_path_factory.mktemp("wan_pipeline")
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder, pipe


def inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(1, 4, 1 + (FRAMES - 1) // 4, HEIGHT // 8, WIDTH // 8, generator=g)
    prompt, negative = torch.randn(1, 7, 32, generator=g), torch.randn(1, 7, 32, generator=g)
    return noise, prompt, negative


def project_sample(folder, noise, prompt, negative, step_sigma: bool = True):
    denoiser = load_denoiser(folder).eval()
    cond = Conditioning(prompt)
    fn = velocity_fn(denoiser, cond, cond.with_text(negative, None), GUIDANCE)
    return sample_with_scheduler(fn, noise, load_scheduler(folder), STEPS,
                                 step_sigma=denoiser.sampler_sigma if step_sigma else None)


def test_registry_reads_the_pipeline_folder(pipeline_folder):
    folder, _ = pipeline_folder
    assert (folder / "model_index.json").is_file()
    assert folder_class_name(folder) == "WanTransformer3DModel"
    assert type(load_denoiser(folder)).__name__ == "WanDenoiser"


def test_wan_teacher_sample_equals_wan_pipeline(pipeline_folder):
    folder, pipe = pipeline_folder
    noise, prompt, negative = inputs()
    with torch.no_grad():
        expected = pipe(prompt_embeds=prompt, negative_prompt_embeds=negative, latents=noise.clone(),
                        height=HEIGHT, width=WIDTH, num_frames=FRAMES, num_inference_steps=STEPS,
                        guidance_scale=GUIDANCE, output_type="latent").frames
    ours = project_sample(folder, noise, prompt, negative)
    assert ours.shape == expected.shape == noise.shape
    assert (ours - expected).abs().max() < TOLERANCE
    # evaluating at the scheduler's float sigmas instead of the integer timesteps is a visible difference
    at_sigmas = project_sample(folder, noise, prompt, negative, step_sigma=False)
    assert (at_sigmas - expected).abs().max() > 10 * TOLERANCE


def test_sampler_sigma_reaches_the_transformer_as_the_integer_timestep(pipeline_folder):
    """Through ``forward``, ``sampler_sigma(t, .)`` arrives as ``timestep == t`` exactly, for
    every integer timestep 0..1000 (float32 ``t / 1000`` would miss some of them)."""
    denoiser = load_denoiser(pipeline_folder[0]).eval()
    timesteps = torch.arange(0, 1001)
    seen = []
    denoiser.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["timestep"]), with_kwargs=True)
    sigma = torch.stack([denoiser.sampler_sigma(t, t / 1000.0) for t in timesteps])
    noise, prompt, _ = inputs()
    with torch.no_grad():
        denoiser(noise.expand(len(timesteps), -1, -1, -1, -1), sigma,
                 Conditioning(prompt.expand(len(timesteps), -1, -1)))
    assert torch.equal(seen[0], timesteps.float())
    assert not torch.equal((1000.0 * (timesteps / 1000.0).float()), timesteps.float())
