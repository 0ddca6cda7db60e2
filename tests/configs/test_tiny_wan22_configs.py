"""configs/tiny-wan2.2-t2v-a14b and configs/tiny-wan2.2-ti2v-5b through the CLI's ``main`` (in
this process: one interpreter's imports for the whole chain), in latent space with the tiny
VAEs: KD pairs -> KD -> DMD2 (a few steps each) -> ``distill-pl export`` of the DMD2 checkpoint
-> evaluate, on the tiny random teachers of scripts/make_tiny_wan22.py. Clips of 5 frames (2
latent frames) keep it short.

T2V-A14B: two experts switched at timestep 875; the 2-step students' levels 1.0 and 0.75 (0.5
through the teacher's shift 3) lie on both sides, so KD and DMD2 train both experts; the pairs
use ``guidance_2`` for the low-noise expert. The exported KD student, called through
``WanPipeline`` as documented (2 steps, its levels bound to the scheduler, no CFG), gives the
project's 2-step sample. TI2V-5B: one transformer with per-token timesteps, a one-step student.
All of it runs in the default suite (each test is one chain; pytest-xdist runs them beside
the other tests).
"""

from __future__ import annotations

import functools
import json

import pytest
import torch
from diffusers import WanPipeline

from distill_pl.data.pairs import read_shard_header
from distill_pl.diffusion.sampling import student_sample
from distill_pl.export.checkpoint import main as export_main
from distill_pl.families.registry import load_denoiser
from distill_pl.models.conditioning import Conditioning
from distill_pl.models.guidance import velocity_fn
from tests.cli_helpers import edited_config, evaluate_tiny_runs, fit_short_run, pipeline_export_settings
from tests.cli_helpers import run_in_process, short_dmd2_trainer, short_kd_trainer
from tests.families.wan22_tiny import write_tiny_wan22

pytestmark = pytest.mark.usefixtures("one_thread")

FRAMES = 5  # 1 + 4: two latent frames
EXPERTS = ("high_noise", "low_noise")


def small_data(cfg, **more):
    cfg["data"].update(max_text_length=8, batch_size=2, val_batch_size=2, num_frames=FRAMES, **more)


def expert_weights(folder, expert: str | None) -> dict[str, torch.Tensor]:
    """The weights of an exported (or teacher) folder's ``expert`` (None: the whole network)."""
    state = load_denoiser(folder).state_dict()
    return {k: v for k, v in state.items() if expert is None or k.startswith(f"{expert}.")}


def changed(before: dict, after: dict) -> bool:
    return before.keys() == after.keys() and any(not torch.equal(before[k], after[k]) for k in before)


def pairs_and_kd(work, kind: str):
    """Teacher, pairs (4 teacher steps) and KD (2 steps) in ``work``; returns the runs' folder."""
    configs, runs = f"configs/tiny-wan2.2-{kind}", work / f"runs/tiny-wan2.2-{kind}"
    write_tiny_wan22(runs / "teacher", kind)

    def pairs(cfg):
        cfg["model"]["init_args"]["num_steps"] = 4
        small_data(cfg, num_examples=2, num_val_examples=2, shard_size=2)

    run_in_process(["predict", "--config", str(edited_config(f"{configs}/kd_pairs.yaml", work / "p.yaml", pairs))],
                   cwd=work)

    def kd(cfg):
        short_kd_trainer(cfg["trainer"], 2)
        small_data(cfg)

    fit_short_run(work, f"{configs}/kd.yaml", "kd.yaml", kd, runs / "kd", steps=2, runner=run_in_process)
    return runs


def dmd2_and_export(work, kind: str, runs) -> None:
    """DMD2 (10 steps: 2 student updates) from the KD run in ``runs``, and ``distill-pl export``
    of its checkpoint, equal to the run's own export."""
    def dmd2(cfg):
        short_dmd2_trainer(cfg["trainer"], 10)
        cfg["model"]["init_args"]["discriminator_hidden"] = 8
        small_data(cfg, samples_per_epoch=20)

    fit_short_run(work, f"configs/tiny-wan2.2-{kind}/dmd2.yaml", "d.yaml", dmd2, runs / "dmd2", steps=10,
                  runner=run_in_process)
    again = work / "dmd2_again"
    export_main(["--ckpt", str(runs / "dmd2/checkpoints/last.ckpt"), "--out", str(again),
                 "--teacher", str(runs / "teacher")])
    settings = pipeline_export_settings(runs / "dmd2/export", "WanPipeline", "WanTransformer3DModel")
    assert json.loads((again / "student.json").read_text()) == settings
    assert not changed(expert_weights(again, None), expert_weights(runs / "dmd2/export", None))


@pytest.fixture(scope="module")
def a14b(tmp_path_factory):
    """(work folder, runs folder) of the T2V-A14B pairs and KD run."""
    work = tmp_path_factory.mktemp("tiny_wan22_a14b")
    return work, pairs_and_kd(work, "t2v-a14b")


def test_two_expert_pairs_and_kd_train_both_experts_through_the_cli(a14b):
    """The pairs record both guidance weights; KD changes both
    experts; the exported KD student through ``WanPipeline`` (2 steps, its levels bound, no CFG)
    is the project's 2-step Euler sample, its second step on the low-noise expert."""
    _, runs = a14b
    meta, _ = read_shard_header(runs / "kd_pairs/train/shard_00000.safetensors")
    assert meta["guidance"] == 8.0 and meta["guidance_2"] == 6.0 and meta["trajectory_sigmas"] == [0.75]
    teacher, kd = runs / "teacher", runs / "kd/export"
    for expert in EXPERTS:
        assert changed(expert_weights(teacher, expert), expert_weights(kd, expert)), expert
    index = json.loads((kd / "model_index.json").read_text())
    assert index["boundary_ratio"] == 0.875 and index["transformer_2"] == ["diffusers", "WanTransformer3DModel"]
    steps = json.loads((kd / "student_steps.json").read_text())
    assert steps["noise_levels"] == [1.0, 0.75]
    pipe = WanPipeline.from_pretrained(str(kd), local_files_only=True, text_encoder=None, tokenizer=None)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler.set_timesteps = functools.partial(pipe.scheduler.set_timesteps, sigmas=steps["scheduler_sigmas"])
    g = torch.Generator().manual_seed(0)
    noise, text = torch.randn(1, 4, 2, 4, 4, generator=g), torch.randn(1, 8, 384, generator=g)
    student = load_denoiser(kd).eval()
    with torch.no_grad():
        ours = student_sample(velocity_fn(student, Conditioning(text)), noise, steps["noise_levels"], steps["sampler"])
        theirs = pipe(prompt_embeds=text, latents=noise.clone(), height=32, width=32, num_frames=FRAMES,
                      num_inference_steps=2, guidance_scale=1.0, output_type="latent").frames
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)


def test_two_expert_dmd2_trains_both_experts_and_evaluates_through_the_cli(a14b):
    work, runs = a14b
    dmd2_and_export(work, "t2v-a14b", runs)
    kd, dmd2 = runs / "kd/export", runs / "dmd2/export"  # DMD2 starts from the KD run's EMA, the KD export
    for expert in EXPERTS:
        assert changed(expert_weights(kd, expert), expert_weights(dmd2, expert)), expert
    index = json.loads((dmd2 / "model_index.json").read_text())
    assert index["boundary_ratio"] == 0.875 and index["transformer_2"] == ["diffusers", "WanTransformer3DModel"]
    assert json.loads((dmd2 / "student_steps.json").read_text())["noise_levels"] == [1.0, 0.75]
    evaluate_tiny_runs(work, "configs/tiny-wan2.2-t2v-a14b/eval.yaml",
                       runs / "eval/report.json", {}, runner=run_in_process, student_steps=2,
                       num_frames=FRAMES, max_text_length=8)

    # Phased DMD at the experts' boundary: levels 1.0 (high-noise expert) and 0.75 (low-noise),
    # one phase each, two generator updates per phase; both experts change
    def phased(cfg):
        short_dmd2_trainer(cfg["trainer"], 20)
        cfg["trainer"]["default_root_dir"] = "runs/tiny-wan2.2-t2v-a14b/phased_dmd"
        cfg["model"]["init_args"].update(discriminator_hidden=8, phased_dmd=True, phase_boundaries="experts",
                                         phase_generator_steps=2)
        small_data(cfg, samples_per_epoch=40)

    fit_short_run(work, "configs/tiny-wan2.2-t2v-a14b/dmd2.yaml", "phased.yaml", phased, runs / "phased_dmd",
                  steps=20, runner=run_in_process)
    for expert in EXPERTS:
        assert changed(expert_weights(kd, expert), expert_weights(runs / "phased_dmd/export", expert)), expert


def test_ti2v_chain_through_the_cli(tmp_path):
    runs = pairs_and_kd(tmp_path, "ti2v-5b")
    dmd2_and_export(tmp_path, "ti2v-5b", runs)
    meta, _ = read_shard_header(runs / "kd_pairs/train/shard_00000.safetensors")
    assert meta["latent_shape"] == [4, 2, 4, 4] and "guidance_2" not in meta
    teacher, kd, dmd2 = runs / "teacher", runs / "kd/export", runs / "dmd2/export"
    assert changed(expert_weights(teacher, None), expert_weights(kd, None))
    assert changed(expert_weights(kd, None), expert_weights(dmd2, None))
    assert json.loads((dmd2 / "model_index.json").read_text())["expand_timesteps"] is True
    evaluate_tiny_runs(tmp_path, "configs/tiny-wan2.2-ti2v-5b/eval.yaml", runs / "eval/report.json", {},
                       runner=run_in_process, num_frames=FRAMES, max_text_length=8)
