"""CosmosTransferDenoiser against diffusers' Cosmos2_5_TransferPipeline (tiny random components)."""

from __future__ import annotations

import shutil

import pytest
import torch

from distill_pl.diffusion.flow import cosmos_guidance_to_w
from distill_pl.diffusion.sampling import sample_with_scheduler
from distill_pl.models.autoencoder import WanVAE
from distill_pl.models.conditioning import Conditioning
from distill_pl.families.cosmos_transfer.adapter import CosmosTransferDenoiser
from distill_pl.families.cosmos_transfer.configs import COSMOS_TRANSFER_2_5_2B
from distill_pl.models.guidance import velocity_fn
from distill_pl.models.loading import ModelFolderError
from distill_pl.export.model_folders import load_scheduler
from tests.families import cosmos_tiny

FRAMES, HEIGHT, WIDTH = 5, 32, 32  # one chunk: 2 latent frames of 4 x 4
LATENT_SHAPE = (cosmos_tiny.LATENT_CHANNELS, 2, 4, 4)
#: max |project - pipeline| over the 4-step CFG sample (values up to ~5; 4.8e-6 seen on
#: 2026-12-02): the project batches
#: both CFG branches into one call and writes CFG as u + w (c - u), the pipeline makes two calls
#: and writes c + g (c - u); float32 rounding of those, plus the pipeline's posterior sample of
#: the control latents (std 3e-7 in the tiny VAE) against the project's posterior mean
PARITY_ATOL = 2e-5


@pytest.fixture(scope="module")
def teacher_folder(cosmos_pipeline_folder, one_thread):
    return cosmos_pipeline_folder


@pytest.fixture(scope="module")
def pipeline(teacher_folder):
    pipe = cosmos_tiny.load_pipeline(teacher_folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def teacher(teacher_folder):
    return CosmosTransferDenoiser(path=str(teacher_folder), control_scale=0.7).eval()


def make_inputs(seed=0):
    """Initial latents [1, 16, 2, 4, 4], prompt and negative embeddings [1, 6, 32], and a
    binary (canny-like) control video [1, 3, 5, 32, 32] in {-1, 1}."""
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(1, *LATENT_SHAPE, generator=g)
    prompt = torch.randn(1, 6, cosmos_tiny.TEXT_DIM, generator=g)
    negative = torch.randn(1, 6, cosmos_tiny.TEXT_DIM, generator=g)
    control = (torch.rand(1, 3, FRAMES, HEIGHT, WIDTH, generator=g) < 0.2).float() * 2 - 1
    return latents, prompt, negative, control


def run_pipeline(pipe, latents, prompt, negative, control, steps, guidance_scale, scale, generator=None):
    """The pipeline's latents for one chunk (``num_frames = num_frames_per_chunk``), and the
    control latents it gave the ControlNet. ``control`` [B, 3, T, H, W] in [-1, 1] goes in as
    the documented [0, 1] tensor [B, T, 3, H, W]; ``generator``: the pipeline's (with
    ``latents`` given, it draws the posterior samples of the first chunk's conditional video,
    then of the control)."""
    captured = []
    hook = pipe.controlnet.register_forward_pre_hook(
        lambda module, args, kwargs: captured.append(kwargs["controls_latents"]), with_kwargs=True
    )
    try:
        out = pipe(
            controls=((control + 1) / 2).permute(0, 2, 1, 3, 4),
            controls_conditioning_scale=scale,
            prompt_embeds=prompt,
            negative_prompt_embeds=negative,
            height=HEIGHT,
            width=WIDTH,
            num_frames=FRAMES,
            num_frames_per_chunk=FRAMES,
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            latents=latents.clone(),
            generator=generator,
            output_type="latent",
        ).frames
    finally:
        hook.remove()
    return out, captured[0]


def test_cfg_sample_equals_pipeline(teacher_folder, pipeline, teacher):
    """The project's 4-step CFG teacher sample (the folder's scheduler, velocity_fn with
    w = g + 1, control through WanVAE) equals the pipeline's for the same inputs."""
    latents, prompt, negative, control = make_inputs()
    g = 3.0
    expected, pipeline_control = run_pipeline(pipeline, latents, prompt, negative, control, 4, g, 0.7)

    control_latents = teacher.encode_control(control, WanVAE(str(teacher_folder)))
    torch.testing.assert_close(control_latents, pipeline_control, rtol=0, atol=2e-6)
    cond = Conditioning(prompt, None, control_latents)
    uncond = Conditioning(negative, None, control_latents)
    fn = velocity_fn(teacher, cond, uncond, cosmos_guidance_to_w(g))
    sample = sample_with_scheduler(fn, latents.clone(), load_scheduler(str(teacher_folder)), 4)

    assert sample.shape == expected.shape == (1, *LATENT_SHAPE)
    assert (sample - expected).abs().max() <= PARITY_ATOL
    # and the sample depends on what is compared: the control, the prompt and the guidance
    other = sample_with_scheduler(
        velocity_fn(teacher, cond, uncond, 1.0), latents.clone(), load_scheduler(str(teacher_folder)), 4
    )
    assert (other - expected).abs().max() > 100 * PARITY_ATOL


def test_adapter_calls_equal_pipeline_calls_exactly(teacher_folder, pipeline, teacher):
    """With the pipeline's own control latents, its two calls per step and its CFG form, the
    adapter reproduces the pipeline bit for bit: every input convention is the pipeline's."""
    latents, prompt, negative, control = make_inputs(seed=1)
    g = 2.0
    expected, pipeline_control = run_pipeline(pipeline, latents, prompt, negative, control, 3, g, 0.7)
    cond = Conditioning(prompt, None, pipeline_control)
    uncond = Conditioning(negative, None, pipeline_control)

    def pipeline_form(x_t, sigma):
        v_cond, v_uncond = teacher(x_t, sigma, cond), teacher(x_t, sigma, uncond)
        return v_cond + g * (v_cond - v_uncond)

    sample = sample_with_scheduler(pipeline_form, latents.clone(), load_scheduler(str(teacher_folder)), 3)
    assert torch.equal(sample, expected)


def test_attributes(teacher):
    assert (teacher.latent_channels, teacher.control_channels) == (16, 16)
    assert (teacher.num_blocks, teacher.feature_dim, teacher.patch_size) == (2, 32, (1, 2, 2))
    assert teacher.blocks is teacher.transformer.transformer_blocks
    assert len(teacher.fsdp_units) == 4  # 2 base + 2 ControlNet blocks
    assert teacher.adapter_options == {"control_scale": 0.7, "freeze_control_branch": False, "control_encoding": "mean",
                                       "conditional_frame_timestep": 0.1}
    assert set(teacher.backbone_config) == {"transformer", "controlnet"}
    names = [name for name, _ in teacher.named_modules()]
    for target in teacher.lora_targets:
        hits = [n for n in names if n.endswith(target)]
        assert any(n.startswith("transformer.transformer_blocks.") for n in hits), target
        assert any(n.startswith("controlnet.control_blocks.") for n in hits), target


def small_inputs(batch=2, seed=3):
    g = torch.Generator().manual_seed(seed)
    x_t = torch.randn(batch, *LATENT_SHAPE, generator=g)
    sigma = torch.tensor([0.3, 0.9])[:batch]
    text = torch.randn(batch, 5, cosmos_tiny.TEXT_DIM, generator=g)
    control = torch.randn(batch, *LATENT_SHAPE, generator=g)
    return x_t, sigma, Conditioning(text, torch.ones(batch, 5, dtype=torch.bool), control)


def test_control_scale_scales_the_residuals(teacher):
    """Scale 0: exactly the base transformer without residuals; other scales change v."""
    x_t, sigma, cond = small_inputs()
    zero = CosmosTransferDenoiser.from_config(teacher.backbone_config, control_scale=0.0)
    zero.load_state_dict(teacher.state_dict())
    with torch.no_grad():
        v_zero = zero(x_t, sigma, cond)
        base = zero.transformer(
            hidden_states=x_t,
            timestep=sigma.view(2, 1, 1, 1, 1).expand(2, 1, 2, 1, 1),
            encoder_hidden_states=(cond.text_embeds, torch.zeros(2, 4, 32)),
            condition_mask=torch.zeros(2, 1, 2, 4, 4),
            padding_mask=torch.zeros(1, 1, 4, 4),
            return_dict=False,
        )[0]
        v = teacher(x_t, sigma, cond)
    torch.testing.assert_close(v_zero, base, rtol=0, atol=0)
    assert (v - v_zero).abs().max() > 1e-3


def test_feature_block(teacher):
    x_t, sigma, cond = small_inputs()
    captured = []
    hook = teacher.blocks[1].register_forward_hook(lambda m, a, out: captured.append(out))
    with torch.no_grad():
        v, features = teacher(x_t, sigma, cond, feature_block=1)
    hook.remove()
    assert features.shape == (2, 32, 2, 2, 2)
    torch.testing.assert_close(features[:, :, 1, 0, 1], captured[0][:, 1 * 4 + 0 * 2 + 1])
    with torch.no_grad():
        torch.testing.assert_close(v, teacher(x_t, sigma, cond), rtol=0, atol=0)
    with pytest.raises(ValueError, match="valid blocks are 0..1"):
        teacher(x_t, sigma, cond, feature_block=2)


@pytest.mark.parametrize("freeze", [False, True])
def test_base_and_control_branch_train_together_unless_frozen(teacher, freeze):
    student = CosmosTransferDenoiser.from_config(
        teacher.backbone_config, gradient_checkpointing=True, freeze_control_branch=freeze
    )
    student.load_state_dict(teacher.state_dict())
    student.requires_grad_(False).requires_grad_(True)  # as stages toggle optimisers
    x_t, sigma, cond = small_inputs()
    student(x_t, sigma, cond).square().mean().backward()
    base_grads = [p.grad for p in student.transformer.parameters()]
    control_grads = [p.grad for p in student.controlnet.parameters()]
    assert all(p.requires_grad for p in student.transformer.parameters())
    assert any(g is not None and g.abs().sum() > 0 for g in base_grads)
    if freeze:
        assert not any(p.requires_grad for p in student.controlnet.parameters())
        assert all(g is None for g in control_grads)
    else:
        assert all(p.requires_grad for p in student.controlnet.parameters())
        assert student.controlnet.control_blocks[0].after_proj.weight.grad.abs().sum() > 0


def test_save_and_load_back(teacher, tmp_path):
    teacher.save_pretrained(str(tmp_path / "student"))
    assert sorted(p.name for p in (tmp_path / "student").iterdir()) == ["controlnet", "transformer"]
    loaded = CosmosTransferDenoiser(path=str(tmp_path / "student"), control_scale=0.7).eval()
    x_t, sigma, cond = small_inputs()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x_t, sigma, cond), teacher(x_t, sigma, cond), rtol=0, atol=0)
    state = teacher.pretrained_state_dict(str(tmp_path / "student"))
    assert state.keys() == teacher.state_dict().keys()


def test_controlnet_folder_from_elsewhere(teacher_folder, tmp_path):
    """A base pipeline folder and a ControlNet variant kept apart (``controlnet_path``)."""
    shutil.copytree(teacher_folder / "controlnet", tmp_path / "edge")
    base = tmp_path / "base"
    base.mkdir()
    shutil.copytree(teacher_folder / "transformer", base / "transformer")
    denoiser = CosmosTransferDenoiser(path=str(base), controlnet_path=str(tmp_path / "edge"))
    assert denoiser.num_blocks == 2


def test_controlnet_without_base_is_an_error(teacher_folder, tmp_path):
    bare = tmp_path / "bare"
    shutil.copytree(teacher_folder / "controlnet", bare)
    with pytest.raises(ModelFolderError, match=rf"{bare}: a bare CosmosControlNetModel folder has no base"):
        CosmosTransferDenoiser(path=str(bare))
    only = tmp_path / "only_controlnet"
    shutil.copytree(teacher_folder / "controlnet", only / "controlnet")
    with pytest.raises(ModelFolderError, match=rf"{only}: has controlnet/ but no transformer/"):
        CosmosTransferDenoiser(path=str(only))
    base_only = tmp_path / "base_only"
    shutil.copytree(teacher_folder / "transformer", base_only / "transformer")
    with pytest.raises(ModelFolderError, match=rf"{base_only}: no controlnet/"):
        CosmosTransferDenoiser(path=str(base_only))


def test_mismatched_pair_is_an_error(teacher):
    config = teacher.backbone_config
    config["controlnet"]["n_controlnet_blocks"] = 3
    with pytest.raises(ValueError, match="controlnet has 3 blocks, the transformer injects 2 residuals"):
        CosmosTransferDenoiser.from_config(config)


def test_control_video_of_wrong_length_or_size(teacher, teacher_folder):
    vae = WanVAE(str(teacher_folder))
    with pytest.raises(ValueError, match="control video has 6 frames; the VAE needs 1 \\+ 4k frames"):
        teacher.encode_control(torch.zeros(1, 3, 6, 32, 32), vae)
    with pytest.raises(ValueError, match="control video is 32x24; height and width must be multiples of 16"):
        teacher.encode_control(torch.zeros(1, 3, 5, 32, 24), vae)
    x_t, sigma, cond = small_inputs()
    short = Conditioning(cond.text_embeds, None, cond.control[:, :, :1])
    with pytest.raises(ValueError, match=r"cond.control must be \[2, 16, 2, 4, 4\].*got \[2, 16, 1, 4, 4\]"):
        teacher(x_t, sigma, short)
    with pytest.raises(ValueError, match="needs cond.control"):
        teacher(x_t, sigma, Conditioning(cond.text_embeds))


def test_real_size_2b_on_meta():
    denoiser = CosmosTransferDenoiser.from_config(COSMOS_TRANSFER_2_5_2B, dtype="bfloat16", on_meta=True)
    base = sum(p.numel() for p in denoiser.transformer.parameters())
    control = sum(p.numel() for p in denoiser.controlnet.parameters())
    print(f"Cosmos-Transfer2.5-2B: base {base / 1e9:.3f} B, ControlNet {control / 1e9:.3f} B parameters")
    assert all(p.is_meta for p in denoiser.parameters())
    assert (denoiser.num_blocks, denoiser.feature_dim, denoiser.text_dim) == (28, 2048, 100352)
    assert len(denoiser.fsdp_units) == 28 + 4
    # "2B": 28 blocks of width 2048 (~2.2 B) + the 100352 -> 1024 text projection (0.1 B)
    assert 2.2e9 < base < 2.6e9 and 0.3e9 < control < 0.6e9


def test_control_encoding_is_the_posterior_mean_or_the_pipelines_draw(teacher_folder, tmp_path):
    """``control_encoding``: "mean" (default) is the VAE's posterior mean, as before; "sample"
    is a posterior draw, repeatable with a seed, the pipeline's own for the same generator.
    The tiny pipeline's VAE is made deterministic, so this one has a VAE whose posterior is not."""
    folder = tmp_path / "pipeline"
    shutil.copytree(teacher_folder, folder)
    shutil.rmtree(folder / "vae")
    cosmos_tiny.script.tiny_vae(deterministic=False).save_pretrained(str(folder / "vae"), safe_serialization=True)
    vae = WanVAE(str(folder))
    _, _, _, control = make_inputs(seed=4)
    by_default = CosmosTransferDenoiser(path=str(folder))
    sampling = CosmosTransferDenoiser(path=str(folder), control_encoding="sample")
    assert by_default.adapter_options["control_encoding"] == "mean"
    assert sampling.adapter_options["control_encoding"] == "sample"  # student.json records it

    mean = by_default.encode_control(control, vae)
    torch.testing.assert_close(mean, vae.encode(control), rtol=0, atol=0)
    draw = sampling.encode_control(control, vae, torch.Generator().manual_seed(5))
    assert (draw - mean).abs().max() > 0.1
    torch.testing.assert_close(sampling.encode_control(control, vae, torch.Generator().manual_seed(5)), draw,
                               rtol=0, atol=0)
    torch.manual_seed(6)  # no generator: torch's global RNG (seeded in training)
    first = sampling.encode_control(control, vae)
    torch.manual_seed(6)
    torch.testing.assert_close(sampling.encode_control(control, vae), first, rtol=0, atol=0)

    pipe = cosmos_tiny.load_pipeline(folder)
    pipe.set_progress_bar_config(disable=True)
    latents, prompt, negative, control = make_inputs(seed=4)
    _, pipeline_control = run_pipeline(pipe, latents, prompt, negative, control, 1, 1.0, 0.7,
                                       generator=torch.Generator().manual_seed(5))
    # with latents given, the pipeline's generator first draws the posterior sample of the
    # first chunk's (all-zero) conditional video, then the control's
    generator = torch.Generator().manual_seed(5)
    torch.randn(latents.shape, generator=generator)
    torch.testing.assert_close(pipeline_control, sampling.encode_control(control, vae, generator), rtol=0, atol=2e-6)

    with pytest.raises(ValueError, match=r"denoiser_options.control_encoding must be one of \('mean', 'sample'\), got 'mode'"):
        CosmosTransferDenoiser(path=str(folder), control_encoding="mode")
