"""configs/tiny-wan-vace through the real CLI, in latent space with the tiny VAE: KD pairs ->
KD -> DMD2 (a few steps each) -> evaluate, and ``distill-pl export`` of the DMD2 checkpoint, on
the tiny random VACE teacher of scripts/make_tiny_wan_vace.py; the exported students are full
WanVACEPipeline folders that reproduce the project's one-step output. Clips of 5 frames (2 latent frames) keep it short."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from diffusers import WanVACEPipeline

from distill_pl.data.pairs import read_shard_header
from distill_pl.diffusion.sampling import one_step_sample
from distill_pl.export.checkpoint import main as export_main
from distill_pl.models.autoencoder import WanVAE
from distill_pl.models.conditioning import Conditioning
from distill_pl.families.registry import load_denoiser
from distill_pl.models.guidance import velocity_fn
from tests.cli_helpers import REPO, edited_config, evaluate_tiny_runs, pipeline_export_settings, run_cli
from tests.cli_helpers import fit_short_run, short_dmd2_trainer, short_kd_trainer

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIGS = "configs/tiny-wan-vace"
RUNS = "runs/tiny-wan-vace"
FRAMES = 5  # 1 + 4: two latent frames
SCALE = 0.5  # the conditioning scale every stage takes


def write_teacher(folder):
    spec = importlib.util.spec_from_file_location("make_tiny_wan_vace", REPO / "scripts/make_tiny_wan_vace.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.write_tiny_wan_vace(folder)


def small_data(cfg, **more):
    cfg["data"].update(max_text_length=8, batch_size=2, val_batch_size=2, num_frames=FRAMES, **more)


def with_scale(cfg):
    cfg["model"]["init_args"]["denoiser_options"] = {"conditioning_scale": SCALE}


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    work = tmp_path_factory.mktemp("tiny_wan_vace")
    write_teacher(work / RUNS / "teacher")
    return work


def pipeline_one_step(folder, noise, text_embeds, control):
    """WanVACEPipeline.from_pretrained(folder) called as documented for a one-step student:
    1 step, no CFG, student.json's conditioning scale, latents out; control [1, 3, T, H, W]
    in [-1, 1] (the pipeline takes it as [1, T, 3, H, W] in [0, 1])."""
    pipe = WanVACEPipeline.from_pretrained(folder, text_encoder=None, tokenizer=None)  # the tiny teacher has none
    pipe.set_progress_bar_config(disable=True)
    options = json.loads((folder / "student.json").read_text())["adapter_options"]
    frames, height, width = control.shape[2:]
    with torch.no_grad():
        return pipe(video=((control + 1) / 2).permute(0, 2, 1, 3, 4), prompt_embeds=text_embeds,
                    conditioning_scale=options["conditioning_scale"], height=height, width=width,
                    num_frames=frames, num_inference_steps=1, guidance_scale=1.0, latents=noise.clone(),
                    output_type="latent").frames


@pytest.mark.slow  # 85-100 s beside the default suite; tests/families/test_conformance.py checks the family's contract and export by default
def test_pairs_kd_dmd2_evaluate_through_the_cli(work):
    def pairs(cfg):
        cfg["model"]["init_args"]["num_steps"] = 2
        with_scale(cfg)
        small_data(cfg, num_examples=2, num_val_examples=2, shard_size=2)

    run_cli(["predict", "--config", str(edited_config(f"{CONFIGS}/kd_pairs.yaml", work / "p.yaml", pairs))],
            cwd=work)
    meta, _ = read_shard_header(work / RUNS / "kd_pairs/train/shard_00000.safetensors")
    assert meta["latent_shape"] == [4, 2, 4, 4] and meta["vae_path"] == f"{RUNS}/teacher"
    assert meta["denoiser_options"] == {"conditioning_scale": SCALE}

    def kd(cfg):
        short_kd_trainer(cfg["trainer"], 2)
        with_scale(cfg)
        small_data(cfg)

    kd_run = fit_short_run(work, f"{CONFIGS}/kd.yaml", "kd.yaml", kd, work / RUNS / "kd", steps=2)
    assert list(kd_run.rglob("grids/step000002_*.png"))

    def dmd2(cfg):
        short_dmd2_trainer(cfg["trainer"], 5)
        cfg["model"]["init_args"]["discriminator_hidden"] = 8
        with_scale(cfg)
        small_data(cfg, samples_per_epoch=8)

    dmd2_run = fit_short_run(work, f"{CONFIGS}/dmd2.yaml", "d.yaml", dmd2, work / RUNS / "dmd2", steps=5)

    # both exports are whole WanVACEPipeline folders with the student's options
    kd_export, dmd2_export = kd_run / "export", dmd2_run / "export"
    for export in (kd_export, dmd2_export):
        settings = pipeline_export_settings(export, "WanVACEPipeline", "WanVACETransformer3DModel")
        assert load_denoiser(export).control_channels == 72
        assert settings["adapter_options"] == {"conditioning_scale": SCALE} and settings["num_frames"] == FRAMES

    # distill-pl export of the DMD2 checkpoint writes the same pipeline folder as the run did
    again = work / "dmd2_again"
    export_main(["--ckpt", str(dmd2_run / "checkpoints/last.ckpt"), "--out", str(again),
                 "--teacher", str(work / RUNS / "teacher")])
    assert json.loads((again / "model_index.json").read_text()) == json.loads((dmd2_export / "model_index.json").read_text())
    assert json.loads((again / "student.json").read_text()) == settings
    assert all(torch.equal(a, b) for a, b in zip(load_denoiser(again).state_dict().values(),
                                                 load_denoiser(dmd2_export).state_dict().values()))

    # the exported pipeline, 1 step without CFG, is the project's one-step output x_g
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(1, 4, 2, 4, 4, generator=g)
    text = torch.randn(1, 8, 384, generator=g)
    control = (torch.rand(1, 3, FRAMES, 32, 32, generator=g) < 0.2).float() * 2 - 1  # canny-like, in {-1, 1}
    student = load_denoiser(dmd2_export, conditioning_scale=SCALE).eval()
    cond = Conditioning(text, None, student.encode_control(control, WanVAE(str(dmd2_export))))
    with torch.no_grad():
        x_g = one_step_sample(velocity_fn(student, cond), noise.clone())
    expected = pipeline_one_step(dmd2_export, noise, text, control)
    assert expected.shape == x_g.shape == (1, 4, 2, 4, 4)
    torch.testing.assert_close(expected, x_g, rtol=0, atol=1e-5)

    evaluate_tiny_runs(work, f"{CONFIGS}/eval.yaml", work / RUNS / "eval/report.json",
                       {"conditioning_scale": SCALE}, num_frames=FRAMES, max_text_length=8)
