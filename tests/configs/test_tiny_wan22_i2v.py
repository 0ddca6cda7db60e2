"""configs/tiny-wan2.2-i2v-a14b through the CLI's ``main`` (in this process), image-to-video
with a manifest that names another conditioning image for one clip: KD pairs -> KD -> DMD2 ->
``distill-pl export`` -> evaluate, on the tiny random two-expert teacher of
scripts/make_tiny_wan22.py (boundary_ratio 0.9), clips of 5 frames (2 latent frames) at 32 x 32.

The manifest holds two bundled clips: carphone_pristine with ``"image": "images/first.png"`` (a
random 32 x 32 PNG, so resizing leaves it as it is and the pipeline gets the same pixels) and
carphone_distorted without one (its first frame is the image). The pairs and KD run in the
default suite: the shards reference the image, their control's first frame is it, and the
exported KD student, called through ``WanImageToVideoPipeline`` with that image as documented
(2 steps, its levels bound to the scheduler, no CFG), gives the project's 2-step sample; DMD2,
export and the evaluation follow, and a TI2V-5B image-to-video KD variant. All in the default
suite (pytest-xdist runs the file beside the others).
"""

from __future__ import annotations

import functools
import json

import numpy as np
import pytest
import torch
from diffusers import WanImageToVideoPipeline
from PIL import Image

from distill_pl.data.bundled import BUNDLED_CLIPS, caption_for
from distill_pl.data.pairs import PairShardDataset, read_shard_header
from distill_pl.diffusion.sampling import student_sample
from distill_pl.families.registry import load_denoiser
from distill_pl.models.autoencoder import WanVAE
from distill_pl.models.conditioning import Conditioning
from distill_pl.models.guidance import velocity_fn
from distill_pl.util.paths import resolve_path
from tests.cli_helpers import edited_config, fit_short_run, pipeline_export_settings, run_in_process
from tests.cli_helpers import short_dmd2_trainer, short_kd_trainer
from tests.configs.test_tiny_wan22_configs import changed, expert_weights
from tests.families.wan22_tiny import write_tiny_wan22

pytestmark = pytest.mark.usefixtures("one_thread")

FRAMES = 5  # 1 + 4: two latent frames
EXPERTS = ("high_noise", "low_noise")
CONFIGS = "configs/tiny-wan2.2-i2v-a14b"


def write_manifest_with_image(work, size: int) -> tuple:
    """``work/data/manifest.jsonl`` of the two carphone clips, the pristine one with a random
    ``size`` x ``size`` PNG as its image; returns (manifest, image path, image pixels [3, H, W]
    in [-1, 1])."""
    clips = resolve_path(BUNDLED_CLIPS)
    image = work / "data" / "images" / "first.png"
    image.parent.mkdir(parents=True)
    pixels = np.random.default_rng(3).integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(image)
    lines = [{"path": str(clips / f"{name}.mp4"), "caption": caption_for(clips / f"{name}.mp4"),
              **({"image": "images/first.png"} if name == "carphone_pristine" else {})}
             for name in ("carphone_pristine", "carphone_distorted")]
    manifest = work / "data" / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return manifest, image, torch.from_numpy(pixels).permute(2, 0, 1).float() / 127.5 - 1


def small_data(cfg, manifest, **more):
    cfg["data"].update(max_text_length=8, batch_size=2, val_batch_size=2, num_frames=FRAMES, **more)
    if cfg["data"]["mode"] != "pairs" or "num_examples" in more:  # KD reads the pairs' own references
        cfg["data"]["manifest"] = str(manifest)


def pairs_and_kd(work, configs: str, runs, manifest, kind: str, **pair_options):
    """Teacher, pairs (4 teacher steps, 2 train and 2 val examples) and KD (2 steps) of
    ``configs`` in ``work``."""
    write_tiny_wan22(runs / "teacher", kind)

    def pairs(cfg):
        cfg["model"]["init_args"].update(num_steps=4, **pair_options)
        small_data(cfg, manifest, num_examples=2, num_val_examples=2, shard_size=2)

    run_in_process(["predict", "--config", str(edited_config(f"{configs}/kd_pairs.yaml", work / "p.yaml", pairs))],
                   cwd=work)

    def kd(cfg):
        short_kd_trainer(cfg["trainer"], 2)
        small_data(cfg, manifest)

    fit_short_run(work, f"{configs}/kd.yaml", "kd.yaml", kd, runs / "kd", steps=2, runner=run_in_process)


@pytest.fixture(scope="module")
def a14b(tmp_path_factory):
    """(work folder, runs folder, manifest, image path, image pixels) of the I2V-A14B pairs and KD run."""
    work = tmp_path_factory.mktemp("tiny_wan22_i2v")
    runs = work / "runs/tiny-wan2.2-i2v-a14b"
    manifest, image, pixels = write_manifest_with_image(work, 32)
    pairs_and_kd(work, CONFIGS, runs, manifest, "i2v-a14b")
    return work, runs, manifest, image, pixels


def test_i2v_pairs_reference_the_image_and_the_kd_student_reloads_as_the_pipeline(a14b):
    """Default suite: the train shard references the manifest's image for the pristine clip's
    row ("" for the other), and reading it back gives that image as the control's first frame;
    KD changes both experts; the exported KD student through ``WanImageToVideoPipeline`` with
    the image equals the project's 2-step Euler sample with it."""
    _, runs, _, image, pixels = a14b
    meta, _ = read_shard_header(runs / "kd_pairs/train/shard_00000.safetensors")
    assert meta["control"] == "clip" and meta["guidance_2"] == 6.0 and meta["trajectory_sigmas"] == [0.75]
    assert sorted(meta["image_paths"]) == ["", str(image)] and str(image) in meta["video_sha256"]
    pairs = PairShardDataset(runs / "kd_pairs/train")
    row = meta["image_paths"].index(str(image))
    assert torch.equal(pairs[row]["control"][:, 0], pixels)
    assert not torch.equal(pairs[row]["video"][:, 0], pixels)  # the clip keeps its own first frame
    other = pairs[1 - row]
    assert torch.equal(other["control"], other["video"])
    teacher, kd = runs / "teacher", runs / "kd/export"
    for expert in EXPERTS:
        assert changed(expert_weights(teacher, expert), expert_weights(kd, expert)), expert
    index = json.loads((kd / "model_index.json").read_text())
    assert index["_class_name"] == "WanImageToVideoPipeline" and index["boundary_ratio"] == 0.9
    steps = json.loads((kd / "student_steps.json").read_text())
    assert steps["noise_levels"] == [1.0, 0.75]
    pipe = WanImageToVideoPipeline.from_pretrained(str(kd), local_files_only=True, text_encoder=None,
                                                   tokenizer=None, image_encoder=None, image_processor=None)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler.set_timesteps = functools.partial(pipe.scheduler.set_timesteps, sigmas=steps["scheduler_sigmas"])
    g = torch.Generator().manual_seed(0)
    noise, text = torch.randn(1, 4, 2, 4, 4, generator=g), torch.randn(1, 8, 384, generator=g)
    student = load_denoiser(kd).eval()
    video = torch.cat([pixels[None, :, None], torch.zeros(1, 3, FRAMES - 1, 32, 32)], dim=2)
    with torch.no_grad():
        control = student.encode_control(video, WanVAE(str(kd)))
        ours = student_sample(velocity_fn(student, Conditioning(text, control=control)), noise,
                              steps["noise_levels"], steps["sampler"])
        theirs = pipe(image=Image.open(image), prompt_embeds=text, latents=noise.clone(), height=32, width=32,
                      num_frames=FRAMES, num_inference_steps=2, guidance_scale=1.0, output_type="latent").frames
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)


def test_i2v_dmd2_trains_both_experts_and_evaluates_against_the_image(a14b):
    """DMD2 (10 steps: 2 student updates) from the KD run trains both experts; ``distill-pl
    export`` of its checkpoint equals the run's export; the evaluation scores the given first
    frame apart, against the manifest's image for the pristine clip's windows."""
    from distill_pl.export.checkpoint import main as export_main

    work, runs, manifest, image, pixels = a14b

    def dmd2(cfg):
        short_dmd2_trainer(cfg["trainer"], 10)
        cfg["model"]["init_args"]["discriminator_hidden"] = 8
        small_data(cfg, manifest, samples_per_epoch=20)

    fit_short_run(work, f"{CONFIGS}/dmd2.yaml", "d.yaml", dmd2, runs / "dmd2", steps=10, runner=run_in_process)
    kd, dmd2_export = runs / "kd/export", runs / "dmd2/export"
    for expert in EXPERTS:
        assert changed(expert_weights(kd, expert), expert_weights(dmd2_export, expert)), expert
    again = work / "dmd2_again"
    export_main(["--ckpt", str(runs / "dmd2/checkpoints/last.ckpt"), "--out", str(again),
                 "--teacher", str(runs / "teacher")])
    settings = pipeline_export_settings(dmd2_export, "WanImageToVideoPipeline", "WanTransformer3DModel")
    assert json.loads((again / "student.json").read_text()) == settings and settings["control"] == "clip"
    assert not changed(expert_weights(again, None), expert_weights(dmd2_export, None))

    def evaluate(cfg):
        cfg.update(teacher_steps=2, few_steps=[1], samples_per_clip=2, bootstrap_resamples=2, batch_size=8,
                   sheet_clips=2)
        small_data(cfg, manifest, val_clips_per_video=1)

    run_in_process(["evaluate", "--config", str(edited_config(f"{CONFIGS}/eval.yaml", work / "e.yaml", evaluate))],
                   cwd=work)
    report = json.loads((runs / "eval/report.json").read_text())
    assert report["settings"]["given_frames"] == 1
    assert report["settings"]["control_fidelity"]["key"] == "image_psnr"
    rows = {row["key"]: row for row in report["methods"]}
    assert list(rows) == ["teacher_2step", "teacher_1step", "student_kd", "student_dmd2"]
    assert [row["nfe"] for row in rows.values()] == [4, 2, 2, 2]
    for row in rows.values():
        assert np.isfinite(row["image_psnr"]) and row["image_psnr"] > 0 and row["frechet_distance"] >= 0


# TI2V-5B image-to-video: pairs and KD with the image, 64 x 64 clips
def test_ti2v_image_to_video_kd_through_the_cli(tmp_path):
    """configs/tiny-wan2.2-ti2v-5b with ``image_to_video: true`` and ``control: clip``: the pairs
    reference the manifest's image, and the teacher's samples and the KD student's keep its
    clean latent as their first latent frame."""
    runs = tmp_path / "runs/tiny-wan2.2-ti2v-5b"
    manifest, image, pixels = write_manifest_with_image(tmp_path, 64)
    for name in ("kd_pairs", "kd"):  # the image-to-video variant of the text-to-video configs
        def variant(cfg):
            cfg["model"]["init_args"]["denoiser_options"] = {"image_to_video": True}
            cfg["data"]["control"] = "clip"
        edited_config(f"configs/tiny-wan2.2-ti2v-5b/{name}.yaml", tmp_path / f"{name}.yaml", variant)
    pairs_and_kd(tmp_path, str(tmp_path), runs, manifest, "ti2v-5b")
    meta, _ = read_shard_header(runs / "kd_pairs/train/shard_00000.safetensors")
    assert meta["denoiser_options"] == {"image_to_video": True} and sorted(meta["image_paths"]) == ["", str(image)]
    row = meta["image_paths"].index(str(image))
    pairs = PairShardDataset(runs / "kd_pairs/train")
    vae = WanVAE(str(runs / "teacher"))
    with torch.no_grad():
        latent = vae.encode(pixels[None, :, None])
    # the teacher's sample ends with the image's clean latent, stored in bfloat16 (relative error <= 2^-9)
    torch.testing.assert_close(pairs[row]["teacher_output"][:, :1], latent[0], rtol=2**-8, atol=1e-5)
    assert (pairs[1 - row]["teacher_output"][:, :1] - latent[0]).abs().max() > 0.1  # the other clip: its own frame
    assert changed(expert_weights(runs / "teacher", None), expert_weights(runs / "kd/export", None))
