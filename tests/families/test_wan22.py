"""Wan 2.2: the project's N-step CFG teacher sample against diffusers' ``WanPipeline`` and
``WanImageToVideoPipeline`` (two-expert A14B text- and image-to-video, TI2V-5B text- and
image-to-video; float32, the tiny random pipelines of scripts/make_tiny_wan22.py saved in their
own layout and loaded back through the family registry), the routing between the experts, and
the one-line errors for bad folders and images."""

import json
import shutil

import numpy as np
import pytest
import torch
from diffusers import WanImageToVideoPipeline
from PIL import Image

from distill_pl.diffusion.sampling import sample_with_scheduler
from distill_pl.export.model_folders import load_scheduler
from distill_pl.families.registry import build_denoiser, denoiser_config, folder_class_name, load_denoiser
from distill_pl.families.wan.image_condition import first_frame_condition
from distill_pl.models.autoencoder import WanVAE
from distill_pl.models.conditioning import Conditioning
from distill_pl.models.guidance import velocity_fn
from distill_pl.models.loading import ModelFolderError
from distill_pl.models.lora import add_lora, lora_parameters
from tests.families.wan22_tiny import tiny_wan22_script

#: max |project - pipeline| over latents of order 1 (batched CFG call against the pipeline's
#: two calls; the latents' normalisation by division against multiplication by the reciprocal)
TOLERANCE = 1e-5
STEPS, GUIDANCE, GUIDANCE_2 = 6, 5.0, 3.0
FRAMES = 9
pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = {"t2v-a14b": 32, "i2v-a14b": 32, "ti2v-5b": 64}  # latents [1, 4, 3, 4, 4] for each


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """kind -> (folder, the pipeline it was saved from)."""
    script = tiny_wan22_script()
    root = tmp_path_factory.mktemp("wan22")
    found = {}
    for kind in script.KINDS:
        pipe = script.tiny_wan22_pipeline(kind)
        pipe.save_pretrained(root / kind, safe_serialization=True)
        found[kind] = (root / kind, pipe)
    return found


def inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(1, 4, 3, 4, 4, generator=g)
    prompt, negative = torch.randn(1, 7, 384, generator=g), torch.randn(1, 7, 384, generator=g)
    return noise, prompt, negative


def image(size, seed=0):
    """A random RGB image as the pipeline takes it (PIL) and as the project holds it
    ([1, 3, H, W] in [-1, 1])."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    return Image.fromarray(pixels), torch.from_numpy(pixels).permute(2, 0, 1)[None].float() / 127.5 - 1.0


def project_sample(folder, noise, prompt, negative, control=None, guidance_2=GUIDANCE_2, boundary=None,
                   **options):
    denoiser = load_denoiser(folder, **options).eval()
    if boundary is not None:
        denoiser.boundary_ratio = boundary
    cond = Conditioning(prompt, control=control)
    fn = velocity_fn(denoiser, cond, cond.with_text(negative, None), GUIDANCE, guidance_2)
    with torch.no_grad():
        x0 = sample_with_scheduler(fn, noise, load_scheduler(folder), STEPS, step_sigma=denoiser.sampler_sigma)
        return denoiser.finish_sample(x0, cond)


def pipeline_sample(pipe, noise, prompt, negative, size, **call):
    with torch.no_grad():
        return pipe(prompt_embeds=prompt, negative_prompt_embeds=negative, latents=noise.clone(), height=size,
                    width=size, num_frames=FRAMES, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                    output_type="latent", **call).frames


def first_frame_video(picture):
    """A video [1, 3, T, H, W] whose first frame is ``picture`` (the rest is noise: unused)."""
    rest = torch.rand(1, 3, FRAMES - 1, *picture.shape[2:], generator=torch.Generator().manual_seed(5)) * 2 - 1
    return torch.cat([picture[:, :, None], rest], dim=2)


def test_registry_picks_the_wan22_adapters(tiny):
    expected = {"t2v-a14b": "WanExpertsDenoiser", "i2v-a14b": "WanExpertsDenoiser", "ti2v-5b": "WanTI2VDenoiser"}
    for kind, (folder, _) in tiny.items():
        assert folder_class_name(folder) == "WanTransformer3DModel"
        denoiser = load_denoiser(folder)
        assert type(denoiser).__name__ == expected[kind]
        # the folder's config builds the same architecture; its weights are the folder's
        rebuilt = build_denoiser(*denoiser_config(folder), on_meta=True)
        assert type(rebuilt) is type(denoiser) and rebuilt.backbone_config == denoiser.backbone_config
        state = denoiser.pretrained_state_dict(str(folder))
        assert state.keys() == denoiser.state_dict().keys()
        assert all(torch.equal(v, denoiser.state_dict()[k]) for k, v in state.items())
    experts = load_denoiser(tiny["i2v-a14b"][0])
    assert experts.boundary_ratio == 0.9 and experts.control_channels == 8
    assert len(experts.fsdp_units) == 4  # both experts' blocks


@pytest.mark.parametrize("kind", ["t2v-a14b", "ti2v-5b"])
def test_text_to_video_sample_equals_wan_pipeline(tiny, kind):
    folder, pipe = tiny[kind]
    noise, prompt, negative = inputs()
    call, guidance_2 = ({"guidance_scale_2": GUIDANCE_2}, GUIDANCE_2) if kind == "t2v-a14b" else ({}, None)
    expected = pipeline_sample(pipe, noise, prompt, negative, SIZE[kind], **call)
    ours = project_sample(folder, noise, prompt, negative, guidance_2=guidance_2)
    assert ours.shape == expected.shape == noise.shape
    assert (ours - expected).abs().max() < TOLERANCE


def test_both_experts_run_and_the_wrong_boundary_breaks_parity(tiny):
    folder, pipe = tiny["t2v-a14b"]
    scheduler = load_scheduler(folder)
    scheduler.set_timesteps(STEPS)
    assert (scheduler.timesteps >= 875).any() and (scheduler.timesteps < 875).any()
    noise, prompt, negative = inputs()
    expected = pipeline_sample(pipe, noise, prompt, negative, SIZE["t2v-a14b"], guidance_scale_2=GUIDANCE_2)
    for boundary in (0.5, 0.95):  # one step routed to the other expert either way
        moved = project_sample(folder, noise, prompt, negative, boundary=boundary)
        assert (moved - expected).abs().max() > 1e-3
    # the low-noise expert's own guidance matters too
    same_guidance = project_sample(folder, noise, prompt, negative, guidance_2=GUIDANCE)
    assert (same_guidance - expected).abs().max() > 1e-3


def test_image_to_video_a14b_sample_equals_the_pipeline(tiny):
    folder, pipe = tiny["i2v-a14b"]
    size = SIZE["i2v-a14b"]
    noise, prompt, negative = inputs()
    picture, pixels = image(size)
    expected = pipeline_sample(pipe, noise, prompt, negative, size, image=picture, guidance_scale_2=GUIDANCE_2)
    denoiser = load_denoiser(folder)
    with torch.no_grad():
        control = denoiser.encode_control(first_frame_video(pixels), WanVAE(str(folder)))
        _, pipeline_condition = pipe.prepare_latents(pipe.video_processor.preprocess(picture, size, size), 1, 4,
                                                     size, size, FRAMES, torch.float32, torch.device("cpu"),
                                                     None, noise.clone())
    assert control.shape == (1, 8, 3, 4, 4)
    assert (control - pipeline_condition).abs().max() < TOLERANCE
    ours = project_sample(folder, noise, prompt, negative, control=control)
    assert (ours - expected).abs().max() < TOLERANCE


def test_image_to_video_ti2v_sample_equals_the_pipeline(tiny):
    folder, pipe = tiny["ti2v-5b"]
    size = SIZE["ti2v-5b"]
    i2v = WanImageToVideoPipeline(tokenizer=None, text_encoder=None, image_encoder=None, image_processor=None,
                                  vae=pipe.vae, transformer=pipe.transformer, scheduler=load_scheduler(folder),
                                  expand_timesteps=True)
    noise, prompt, negative = inputs()
    picture, pixels = image(size)
    expected = pipeline_sample(i2v, noise, prompt, negative, size, image=picture)
    denoiser = load_denoiser(folder, image_to_video=True)
    assert denoiser.control_channels == 4 and load_denoiser(folder).control_channels == 0  # text-to-video
    with torch.no_grad():
        control = denoiser.encode_control(first_frame_video(pixels), WanVAE(str(folder)))
    assert control.shape == (1, 4, 1, 4, 4)
    ours = project_sample(folder, noise, prompt, negative, control=control, guidance_2=None, image_to_video=True)
    assert (ours - expected).abs().max() < TOLERANCE
    assert torch.equal(ours[:, :, :1], control)  # the clean first frame, as the pipeline ends
    # text-to-video from the same noise is another video
    assert (project_sample(folder, noise, prompt, negative, guidance_2=None) - expected).abs().max() > 1e-3


def test_a_mixed_batch_runs_each_sample_on_its_expert_and_trains_it(tiny):
    denoiser = load_denoiser(tiny["t2v-a14b"][0]).eval()
    noise, prompt, _ = inputs()
    x_t = torch.cat([noise, noise.flip(-1), noise.flip(-2)])
    sigma = torch.tensor([0.95, 0.3, 0.9], dtype=torch.float64)
    cond = Conditioning(torch.cat([prompt] * 3))
    assert denoiser.low_noise_levels(sigma).tolist() == [False, True, False]
    with torch.no_grad():
        velocity, features = denoiser(x_t, sigma, cond, feature_block=1)
        for i, expert in enumerate([denoiser.high_noise, denoiser.low_noise, denoiser.high_noise]):
            alone, alone_features = expert(x_t[i:i + 1], sigma[i:i + 1], cond.select([i]), feature_block=1)
            assert (velocity[i:i + 1] - alone).abs().max() < 1e-6
            assert (features[i:i + 1] - alone_features).abs().max() < 1e-6
    # gradients reach each expert through its own samples only; LoRA adapters go into both
    add_lora(denoiser, rank=2)
    loras = lora_parameters(denoiser)
    assert any(k.startswith("high_noise.") for k in loras) and any(k.startswith("low_noise.") for k in loras)
    torch.manual_seed(0)
    for p in loras.values():  # lora_B starts at zero: give every adapter an effect
        torch.nn.init.normal_(p, std=0.1)
    denoiser(x_t[:1], sigma[:1], cond.select([0])).square().mean().backward()
    assert all(p.grad is None for k, p in loras.items() if k.startswith("low_noise."))
    denoiser(x_t, sigma, cond).square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in loras.values())


def test_an_expert_needed_on_another_process_runs_on_a_placeholder(tiny, monkeypatch):
    """Sharded over several processes, an expert that another data-parallel rank runs is called
    here too (FSDP2 all-gathers and reduce-scatters each unit over all processes): this
    process's batch, all at high-noise levels, keeps the high-noise expert's velocity and
    features, and the low-noise expert gets zero gradients (not none), so its reduction runs."""
    denoiser = load_denoiser(tiny["t2v-a14b"][0]).eval()
    noise, prompt, _ = inputs()
    x_t, sigma, cond = torch.cat([noise, noise.flip(-1)]), torch.tensor([0.95, 0.9]), Conditioning(prompt.repeat(2, 1, 1))
    with torch.no_grad():
        alone = denoiser.high_noise(x_t, sigma, cond, feature_block=1)
    monkeypatch.setattr(type(denoiser), "_experts_to_run", lambda self, low: (True, True))
    velocity, features = denoiser(x_t, sigma, cond, feature_block=1)
    assert torch.equal(velocity, alone[0]) and torch.equal(features, alone[1])
    (velocity.square().mean() + features.mean()).backward()
    low = [p.grad for p in denoiser.low_noise.parameters()]
    assert all(g is not None for g in low) and all(not g.any() for g in low)
    assert any(p.grad.any() for p in denoiser.high_noise.parameters())


def test_guidance_2_needs_two_experts(tiny):
    one = load_denoiser(tiny["ti2v-5b"][0])
    noise, prompt, negative = inputs()
    cond = Conditioning(prompt)
    with pytest.raises(ValueError, match="guidance_2=.* needs a two-expert teacher"):
        velocity_fn(one, cond, cond.with_text(negative, None), GUIDANCE, GUIDANCE_2)


def test_second_expert_without_boundary_is_a_one_line_error(tiny, tmp_path):
    folder = shutil.copytree(tiny["t2v-a14b"][0], tmp_path / "no_boundary")
    index = json.loads((folder / "model_index.json").read_text())
    index["boundary_ratio"] = None
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ModelFolderError, match=r"model_index.json: lists transformer_2 .* boundary_ratio is None") as err:
        load_denoiser(folder)
    assert "\n" not in str(err.value)


def test_experts_of_different_shapes_are_a_one_line_error(tiny, tmp_path):
    folder = shutil.copytree(tiny["t2v-a14b"][0], tmp_path / "other_shapes")
    config = json.loads((folder / "transformer_2/config.json").read_text())
    config["ffn_dim"] = 128
    (folder / "transformer_2/config.json").write_text(json.dumps(config))
    with pytest.raises(ModelFolderError, match=r"other_shapes: the experts .* differ in shape \(ffn_dim: 64 vs 128\)") as err:
        load_denoiser(folder)
    assert "\n" not in str(err.value)


def test_saved_components_hold_the_layout_in_the_pipelines_model_index(tiny, tmp_path):
    """``save_components`` writes the pipeline's own ``model_index.json`` (class, boundary_ratio,
    expand_timesteps, the experts) with the components it does not hold as ``[null, null]``;
    the conformance test reloads such folders."""
    for kind, (folder, _) in tiny.items():
        denoiser = load_denoiser(folder)
        denoiser.save_components(str(tmp_path / kind))
        pipeline_index = json.loads((folder / "model_index.json").read_text())
        absent = {"vae", "scheduler"}  # the teacher folder's components that are not the denoiser's
        assert json.loads((tmp_path / kind / "model_index.json").read_text()) == {
            key: [None, None] if key in absent else value for key, value in pipeline_index.items()}


def test_a_two_expert_folder_without_its_model_index_is_a_one_line_error(tiny, tmp_path):
    """Model folders saved before ``save_components`` wrote the layout: two experts without the
    index are refused (read as Wan 2.1 they would lose the low-noise expert); one TI2V
    transformer without it is read as Wan 2.1, as before."""
    folder = tmp_path / "experts"
    load_denoiser(tiny["t2v-a14b"][0]).save_components(str(folder))
    (folder / "model_index.json").unlink()
    with pytest.raises(ModelFolderError, match=r"experts: holds transformer_2/ .* but no model_index.json") as err:
        load_denoiser(folder)
    assert "\n" not in str(err.value)
    one = tmp_path / "ti2v"
    load_denoiser(tiny["ti2v-5b"][0]).save_components(str(one))
    (one / "model_index.json").unlink()
    assert type(load_denoiser(one)).__name__ == "WanDenoiser"


def test_image_of_the_wrong_size_is_a_one_line_error(tiny):
    folder = tiny["i2v-a14b"][0]
    vae = WanVAE(str(folder))
    _, pixels = image(16)
    with pytest.raises(ValueError, match=r"conditioning image must be \[B, 3, 32, 32\] .* got \[1, 3, 16, 16\]") as err:
        first_frame_condition(pixels, FRAMES, 32, 32, vae)
    assert "\n" not in str(err.value)
    denoiser = load_denoiser(folder)
    noise, prompt, _ = inputs()
    with torch.no_grad():
        small = denoiser.encode_control(first_frame_video(pixels), vae)  # a 16 x 16 video's condition
    with pytest.raises(ValueError, match=r"cond.control must be \[1, 8, 3, 4, 4\]"):
        denoiser(noise, torch.ones(1), Conditioning(prompt, control=small))


def test_published_wan22_configs_build_on_meta():
    """The published Wan 2.2 configs (families/wan/configs.py) as the registry builds them
    without a folder: two 14B experts switched at 0.875, TI2V-5B on 48 channels; the I2V experts
    are the T2V ones with 16 + 4 + 16 input channels, switched at 0.9."""
    from distill_pl.families.registry import published_configs

    published = published_configs()
    experts = build_denoiser(*published["Wan2.2-T2V-A14B-Diffusers"], on_meta=True)
    assert type(experts).__name__ == "WanExpertsDenoiser" and experts.boundary_ratio == 0.875
    assert sum(p.numel() for p in experts.parameters()) == 28_576_983_168 and experts.num_blocks == 40
    i2v = published["Wan2.2-I2V-A14B-Diffusers"][1]
    assert i2v["boundary_ratio"] == 0.9 and i2v["pipeline_class"] == "WanImageToVideoPipeline"
    assert i2v["transformer"] == i2v["transformer_2"] == {**experts.backbone_config["transformer"], "in_channels": 36}
    ti2v = build_denoiser(*published["Wan2.2-TI2V-5B-Diffusers"], on_meta=True, image_to_video=True)
    assert type(ti2v).__name__ == "WanTI2VDenoiser" and sum(p.numel() for p in ti2v.parameters()) == 4_999_787_712
    assert ti2v.latent_channels == ti2v.control_channels == 48 and ti2v.feature_dim == 3072


def test_clip_control_gives_the_first_frame_condition(tiny):
    """data.control: clip hands the clip itself to encode_control, which conditions on its
    first frame."""
    from distill_pl.data.controls import ControlSettings

    folder = tiny["i2v-a14b"][0]
    vae, denoiser = WanVAE(str(folder)), load_denoiser(folder)
    _, pixels = image(32)
    clip = first_frame_video(pixels)
    with torch.no_grad():
        control = denoiser.encode_control(ControlSettings("clip").compute(clip), vae)
        assert torch.equal(control, first_frame_condition(pixels, FRAMES, 32, 32, vae))


@pytest.mark.parametrize("levels", [(1.0,), (1.0, 0.5)])
def test_two_expert_student_exports_as_the_official_pipeline(tiny, tmp_path, levels):
    """A two-expert student written as a full WanPipeline folder (both experts, the boundary,
    an Euler scheduler) reloads through the registry and through WanPipeline, whose K-step
    call equals the project's K-step (Euler) sample: one step runs the high-noise expert, the
    second step at sigma 0.5 (timestep 500 < 875) the low-noise one."""
    import functools

    from diffusers import WanPipeline

    from distill_pl.diffusion.sampling import student_sample

    folder = tiny["t2v-a14b"][0]
    student = load_denoiser(folder).eval()
    torch.manual_seed(1)
    with torch.no_grad():  # a student that is not the teacher
        for p in student.parameters():
            p.add_(0.01 * torch.randn_like(p))
    export = student.save_student_pipeline(str(tmp_path / "student"), str(folder), shift=1.0,
                                           noise_levels=levels, sampler="euler")
    index = json.loads((export / "model_index.json").read_text())
    assert index["boundary_ratio"] == 0.875 and index["transformer_2"] == ["diffusers", "WanTransformer3DModel"]
    reloaded = load_denoiser(export)
    assert type(reloaded).__name__ == "WanExpertsDenoiser"
    assert all(torch.equal(v, student.state_dict()[k]) for k, v in reloaded.state_dict().items())
    pipe = WanPipeline.from_pretrained(str(export), local_files_only=True, text_encoder=None, tokenizer=None)
    pipe.scheduler.set_timesteps = functools.partial(pipe.scheduler.set_timesteps, sigmas=list(levels))
    noise, prompt, _ = inputs()
    with torch.no_grad():
        ours = student_sample(velocity_fn(student, Conditioning(prompt)), noise, levels, "euler")
        theirs = pipe(prompt_embeds=prompt, latents=noise.clone(), height=32, width=32, num_frames=FRAMES,
                      num_inference_steps=len(levels), guidance_scale=1.0, output_type="latent").frames
        high_only = student_sample(velocity_fn(student.high_noise, Conditioning(prompt)), noise, levels, "euler")
    assert (ours - theirs).abs().max() < TOLERANCE
    if len(levels) > 1:  # the low-noise expert ran the second step
        assert (high_only - theirs).abs().max() > 1e-3
