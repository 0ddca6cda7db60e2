"""configs/tiny-cosmos-transfer2.5 through the real CLI, in latent space with the tiny VAE and
the tiny Qwen2.5-VL text encoder: KD pairs -> KD -> DMD2 (a few steps each) -> evaluate, on the
tiny random teacher of scripts/make_tiny_cosmos_transfer.py; the exported students are full
Cosmos2_5_TransferPipeline folders that reproduce the project's one-step output. Clips of 5
frames (2 latent frames) keep it short."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from distill_pl.data.pairs import read_shard_header
from distill_pl.diffusion.sampling import one_step_sample
from distill_pl.models.autoencoder import WanVAE
from distill_pl.models.conditioning import Conditioning
from distill_pl.families.registry import load_denoiser
from distill_pl.models.guidance import velocity_fn
from tests.cli_helpers import edited_config, evaluate_tiny_runs, pipeline_export_settings, run_cli
from tests.cli_helpers import fit_short_run, short_dmd2_trainer, short_kd_trainer
from tests.families import cosmos_tiny

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIGS = "configs/tiny-cosmos-transfer2.5"
RUNS = "runs/tiny-cosmos-transfer2.5"
FRAMES = 5  # 1 + 4: two latent frames


def small_data(cfg, **more):
    cfg["data"].update(batch_size=2, val_batch_size=2, num_frames=FRAMES, **more)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    work = tmp_path_factory.mktemp("tiny_cosmos")
    cosmos_tiny.write_tiny_cosmos_transfer(work / RUNS / "teacher")
    return work


def pipeline_one_step(folder, noise, text_embeds, control, scale):
    """Cosmos2_5_TransferPipeline.from_pretrained(folder) called as documented for the
    one-step student: 1 step, no CFG, latents out; control [1, 3, T, H, W] in [-1, 1]."""
    pipe = cosmos_tiny.load_pipeline(folder)
    pipe.set_progress_bar_config(disable=True)
    frames, height, width = control.shape[2:]
    return pipe(
        controls=((control + 1) / 2).permute(0, 2, 1, 3, 4),
        controls_conditioning_scale=scale,
        prompt_embeds=text_embeds,
        negative_prompt_embeds=torch.zeros_like(text_embeds),  # unused without CFG
        height=height, width=width, num_frames=frames, num_frames_per_chunk=frames,
        num_inference_steps=1, guidance_scale=1.0, latents=noise.clone(), output_type="latent",
    ).frames


@pytest.mark.slow  # 85-100 s beside the default suite; tests/families/test_conformance.py checks the family's contract and export by default
def test_pairs_kd_dmd2_evaluate_through_the_cli(work):
    def pairs(cfg):
        cfg["model"]["init_args"]["num_steps"] = 2
        cfg["model"]["init_args"]["denoiser_options"]["control_scale"] = 0.5  # every stage: 0.5
        small_data(cfg, num_examples=2, num_val_examples=2, shard_size=2)

    run_cli(["predict", "--config", str(edited_config(f"{CONFIGS}/kd_pairs.yaml", work / "p.yaml", pairs))],
            cwd=work)
    shard = work / RUNS / "kd_pairs/train/shard_00000.safetensors"
    meta, _ = read_shard_header(shard)
    assert meta["latent_shape"] == [16, 2, 4, 4] and meta["vae_path"] == f"{RUNS}/teacher"
    assert meta["text_shape"] == [160, cosmos_tiny.TEXT_DIM]  # Cosmos 2.5 embeddings, D = 2 x 16
    assert meta["denoiser_options"] == {"control_scale": 0.5}
    # Cosmos draws conditional frames by default (0 / 1 / 2 latent frames), capped at T' - 1 = 1
    assert meta["conditional_frame_probabilities"] == [0.6, 0.2, 0.2]
    with safe_open(shard, "pt") as f:
        assert set(f.get_tensor("num_cond_frames").tolist()) <= {0, 1}

    def kd(cfg):
        short_kd_trainer(cfg["trainer"], 2)
        cfg["model"]["init_args"]["denoiser_options"]["control_scale"] = 0.5
        small_data(cfg)

    kd_run = fit_short_run(work, f"{CONFIGS}/kd.yaml", "kd.yaml", kd, work / RUNS / "kd", steps=2)
    assert list(kd_run.rglob("grids/step000002_*.png"))

    def dmd2(cfg):
        short_dmd2_trainer(cfg["trainer"], 5)
        cfg["model"]["init_args"].update(discriminator_hidden=8)
        cfg["model"]["init_args"]["denoiser_options"].update(control_scale=0.5, freeze_control_branch=True)
        small_data(cfg, samples_per_epoch=8)

    dmd2_run = fit_short_run(work, f"{CONFIGS}/dmd2.yaml", "d.yaml", dmd2, work / RUNS / "dmd2", steps=5)

    # both exports are whole Cosmos2_5_TransferPipeline folders with the student's options
    kd_export, dmd2_export = kd_run / "export", dmd2_run / "export"
    for export in (kd_export, dmd2_export):
        settings = pipeline_export_settings(export, "Cosmos2_5_TransferPipeline", "CosmosTransformer3DModel")
        assert settings["adapter_options"]["control_scale"] == 0.5
    # a frozen control branch: DMD2's student (EMA of it) keeps the KD student's ControlNet
    kd_student, dmd2_student = load_denoiser(kd_export), load_denoiser(dmd2_export)
    for name, value in kd_student.controlnet.state_dict().items():
        assert torch.equal(value, dmd2_student.controlnet.state_dict()[name]), name
    assert any(not torch.equal(a, b) for a, b in zip(kd_student.transformer.state_dict().values(),
                                                     dmd2_student.transformer.state_dict().values()))

    # the exported pipeline, 1 step without CFG, is the project's one-step output x_g
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(1, 16, 2, 4, 4, generator=g)
    text = torch.randn(1, 160, cosmos_tiny.TEXT_DIM, generator=g)
    control = (torch.rand(1, 3, FRAMES, 32, 32, generator=g) < 0.2).float() * 2 - 1  # canny-like, in {-1, 1}
    student = load_denoiser(dmd2_export, control_scale=0.5).eval()
    cond = Conditioning(text, None, student.encode_control(control, WanVAE(str(dmd2_export))))
    with torch.no_grad():
        x_g = one_step_sample(velocity_fn(student, cond), noise.clone())
    expected = pipeline_one_step(dmd2_export, noise, text, control, scale=0.5)
    assert expected.shape == x_g.shape == (1, 16, 2, 4, 4)
    torch.testing.assert_close(expected, x_g, rtol=0, atol=2e-5)

    evaluate_tiny_runs(work, f"{CONFIGS}/eval.yaml", work / RUNS / "eval/report.json", {"control_scale": 0.5},
                       num_frames=FRAMES)
