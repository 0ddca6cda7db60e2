"""Wan VACE: the VACE context and the N-step CFG teacher sample against diffusers'
``WanVACEPipeline`` (float32, tiny random components saved with ``save_pretrained`` and loaded
back through the family registry), and the one-line errors for bad input."""

import json

import numpy as np
import pytest
import torch
from diffusers import WanVACEPipeline, WanVACETransformer3DModel
from PIL import Image

from distill_pl.diffusion.sampling import build_flow_scheduler, sample_with_scheduler
from distill_pl.models.autoencoder import WanVAE
from distill_pl.models.conditioning import Conditioning
from distill_pl.families.registry import load_denoiser
from distill_pl.models.guidance import velocity_fn
from distill_pl.models.lora import add_lora, lora_parameters
from distill_pl.export.model_folders import load_scheduler
from tests.families.test_wan_pipeline_parity import tiny_vae

#: max |project - pipeline|: the latents' normalisation (division here, multiplication by the
#: reciprocal in the pipeline) and the batched CFG call are the only differences left
TOLERANCE = 1e-5
STEPS, GUIDANCE, SCALE = 6, 5.0, 0.7
FRAMES, HEIGHT, WIDTH = 9, 32, 32  # latents [1, 4, 3, 4, 4]; context 2 x 4 + 64 = 72 channels
TRANSFORMER = dict(
    patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
    text_dim=32, freq_dim=256, ffn_dim=32, num_layers=3, cross_attn_norm=True,
    qk_norm="rms_norm_across_heads", rope_max_seq_len=32, vace_layers=[0, 2], vace_in_channels=72,
)


@pytest.fixture(scope="module")
def vace_folder(tmp_path_factory):
    torch.manual_seed(0)
    transformer = WanVACETransformer3DModel(**TRANSFORMER).eval()
    with torch.no_grad():  # diffusers zero-initialises the hint projections: make the hints matter
        for block in transformer.vace_blocks:
            block.proj_out.weight.normal_(0.0, 0.2)
    pipe = WanVACEPipeline(tokenizer=None, text_encoder=None, vae=tiny_vae(), transformer=transformer,
                           scheduler=build_flow_scheduler("unipc", shift=3.0))
    folder = tmp_path_factory.mktemp("wan_vace_pipeline")
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder, pipe


def edge_video(seed=0):
    """A binary edge video as the pipeline takes it (PIL frames) and as the project holds it
    ([1, 3, T, H, W] in [-1, 1])."""
    edges = np.random.default_rng(seed).random((FRAMES, HEIGHT, WIDTH)) < 0.2
    pixels = np.repeat(edges[..., None], 3, axis=-1).astype(np.uint8) * 255
    frames = [Image.fromarray(frame) for frame in pixels]
    video = torch.from_numpy(pixels).permute(3, 0, 1, 2)[None].float() / 127.5 - 1.0
    return frames, video


def test_context_equals_the_pipeline_conditioning_latents(vace_folder):
    folder, pipe = vace_folder
    denoiser = load_denoiser(folder).eval()
    autoencoder = WanVAE(str(folder))
    frames, video = edge_video()
    white = [Image.new("L", (WIDTH, HEIGHT), 255)] * FRAMES
    with torch.no_grad():
        pixels, mask, refs = pipe.preprocess_conditions(frames, white, None, 1, HEIGHT, WIDTH, FRAMES,
                                                        torch.float32, torch.device("cpu"))
        expected = torch.cat([pipe.prepare_video_latents(pixels, mask, refs), pipe.prepare_masks(mask, refs)], 1)
        ours = denoiser.encode_control(video, autoencoder)
        # a mask that keeps part of the video: the inactive half and the mask channels differ
        partial = (torch.rand(1, 1, FRAMES, HEIGHT, WIDTH, generator=torch.Generator().manual_seed(1)) > 0.5).float()
        expected_partial = torch.cat([pipe.prepare_video_latents(pixels, partial, refs),
                                      pipe.prepare_masks(partial, refs)], 1)
        ours_partial = denoiser.vace_context(video, partial, autoencoder)
    assert torch.equal(pixels, video)
    assert ours.shape == expected.shape == (1, 72, 3, 4, 4)
    assert (ours - expected).abs().max() < TOLERANCE
    assert (ours_partial - expected_partial).abs().max() < TOLERANCE
    assert (ours_partial - ours).abs().max() > 0.1


def test_vace_teacher_sample_equals_the_vace_pipeline(vace_folder):
    folder, pipe = vace_folder
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(1, 4, 3, 4, 4, generator=g)
    prompt, negative = torch.randn(1, 7, 32, generator=g), torch.randn(1, 7, 32, generator=g)
    frames, video = edge_video()
    with torch.no_grad():
        expected = pipe(video=frames, mask=[Image.new("L", (WIDTH, HEIGHT), 255)] * FRAMES,
                        prompt_embeds=prompt, negative_prompt_embeds=negative, latents=noise.clone(),
                        conditioning_scale=SCALE, height=HEIGHT, width=WIDTH, num_frames=FRAMES,
                        num_inference_steps=STEPS, guidance_scale=GUIDANCE, output_type="latent").frames

    def sample(scale):
        denoiser = load_denoiser(folder, conditioning_scale=scale).eval()
        cond = Conditioning(prompt, None, denoiser.encode_control(video, WanVAE(str(folder))))
        fn = velocity_fn(denoiser, cond, cond.with_text(negative, None), GUIDANCE)
        return sample_with_scheduler(fn, noise, load_scheduler(folder), STEPS, step_sigma=denoiser.sampler_sigma)

    ours = sample(SCALE)
    assert ours.shape == expected.shape == noise.shape
    assert (ours - expected).abs().max() < TOLERANCE
    assert (sample(1.0) - expected).abs().max() > 100 * TOLERANCE  # the scale reaches the hints


def test_adapter_attributes_and_copy(vace_folder):
    denoiser = load_denoiser(vace_folder[0], conditioning_scale=SCALE)
    assert (denoiser.latent_channels, denoiser.control_channels, denoiser.num_blocks) == (4, 72, 3)
    assert len(denoiser.fsdp_units) == 3 + 2  # main blocks + VACE blocks
    copy = denoiser.empty_copy()
    copy.load_state_dict(denoiser.state_dict(), assign=True)
    assert copy.conditioning_scale == SCALE and type(copy) is type(denoiser)
    adapted = set(lora_parameters(add_lora(copy, rank=2)))  # the default targets: both block lists
    assert any(".vace_blocks." in name for name in adapted) and any(".blocks.0." in name for name in adapted)


def test_context_width_that_the_vae_does_not_give_is_one_line_naming_the_folder(vace_folder, tmp_path):
    folder, _ = vace_folder
    torch.manual_seed(0)
    wrong = WanVACETransformer3DModel(**{**TRANSFORMER, "vace_in_channels": 96})
    wrong.save_pretrained(tmp_path / "transformer", safe_serialization=True)
    denoiser = load_denoiser(tmp_path)
    _, video = edge_video()
    with pytest.raises(ValueError, match=r"^VACE model .*transformer: vace_in_channels = 96, but the VAE "
                                         r"gives 2 x 4 latent \+ 64 mask channels = 72$"):
        denoiser.encode_control(video, WanVAE(str(folder)))


def test_control_video_of_the_wrong_length_is_one_line_naming_the_folder(vace_folder):
    folder, _ = vace_folder
    denoiser = load_denoiser(folder)
    _, video = edge_video()
    with pytest.raises(ValueError, match=r"^VACE model .*transformer: the control video has 8 frames; "
                                         r"it needs 1 \+ 4 n frames[^\n]*$"):
        denoiser.encode_control(video[:, :, :8], WanVAE(str(folder)))


def test_model_index_names_the_vace_class(vace_folder):
    index = json.loads((vace_folder[0] / "model_index.json").read_text())
    assert index["transformer"] == ["diffusers", "WanVACETransformer3DModel"]
