"""Precomputed clip latents: the predict run (contents, kill + rerun), and data.mode latents."""

from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKLWan

from distill_pl.cli.main import lightning_main
from distill_pl.data.clip_latents import ClipLatentDataset, read_checked_header, vae_fingerprint
from distill_pl.data.clips import ClipDataset
from distill_pl.data.datamodule import VideoDataModule
from distill_pl.data.shards import ShardError
from distill_pl.models.autoencoder import WanVAE
from distill_pl.models.denoiser import Denoiser
from distill_pl.training.batch import check_precomputed_latents, encode_clip_batch
from tests.cli_helpers import kill_at_first_shard
from tests.training.test_kd_pairs import REPO, cache_dir, shard_files  # noqa: F401 (fixture)

CONFIG = REPO / "configs" / "tiny" / "clip_latents.yaml"
DATA = dict(num_examples=6, shard_size=1, batch_size=1, num_frames=5, frame_stride=2, height=16, width=16,
            val_clips_per_video=2, max_text_length=8, val_fraction=0.25)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def vae_folder(tmp_path_factory) -> Path:
    """A pipeline root with vae/: a random 4-channel AutoencoderKLWan (x4 time, x8 space)."""
    torch.manual_seed(0)
    vae = AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True], latents_mean=[0.5, -0.25, 1.0, 0.0],
                           latents_std=[2.0, 0.5, 1.5, 1.0])
    root = tmp_path_factory.mktemp("pipeline")
    vae.save_pretrained(root / "vae", safe_serialization=True)
    return root


def cli_args(vae: Path, out: Path, cache_dir: Path, **overrides) -> list[str]:
    data = {**DATA, **overrides}
    return [
        "predict", "--config", str(CONFIG), f"--model.init_args.vae_path={vae}",  # "null": pixel space
        f"--data.latents_dir={out}", f"--data.cache_dir={cache_dir}", f"--trainer.default_root_dir={out}",
        f"--data.manifest={cache_dir / 'manifest.jsonl'}",
        "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
        *[f"--data.{k}={v}" for k, v in data.items()],
    ]


@pytest.fixture(scope="module")
def precomputed(vae_folder, cache_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("latents")
    lightning_main(cli_args(vae_folder, out, cache_dir))
    return out


def test_shards_hold_the_vae_latents_of_the_clips_and_controls(precomputed, vae_folder, cache_dir):
    train = ClipLatentDataset(precomputed / "train")
    assert len(train) == 6 and len(ClipLatentDataset(precomputed / "val")) == 4
    meta = read_checked_header(Path(train.files[2]))
    assert meta["vae_sha256"] == vae_fingerprint(str(vae_folder)) and meta["storage_dtype"] == "bfloat16"
    assert meta["latent_shape"] == [4, 2, 2, 2] and (meta["num_frames"], meta["height"]) == (5, 16)
    clips = ClipDataset(cache_dir / "manifest.jsonl", 5, 2, 16, 16, split="train", val_fraction=0.25)
    vae = WanVAE(str(vae_folder))
    for i in (0, 3):
        clip, item = clips[i], train[i]
        assert (item["caption"], item["path"], item["start"], item["index"]) == (clip["caption"], clip["path"], clip["start"], i)
        for name in ("video", "control"):
            expected = vae.encode(clip[name][None])[0].bfloat16().float()
            torch.testing.assert_close(item[f"{name}_latents"], expected, atol=2e-2, rtol=2e-2)


def test_killed_precompute_completes_bit_identical_on_rerun(precomputed, vae_folder, cache_dir, tmp_path):
    out = tmp_path / "latents"
    args = cli_args(vae_folder, out, cache_dir)
    kill_at_first_shard(args, out, tmp_path / "killed_run.log")
    killed, expected = shard_files(out), shard_files(precomputed)
    assert 0 < len(killed) < len(expected) == 10, "the run finished before it was killed"
    assert all(data == expected[name] for name, data in killed.items())
    lightning_main(args)
    assert shard_files(out) == expected


def latents_datamodule(precomputed: Path, cache_dir: Path, **overrides) -> VideoDataModule:
    settings = {k: v for k, v in DATA.items() if k != "shard_size"}
    dm = VideoDataModule(mode="latents", latents_dir=str(precomputed), cache_dir=str(cache_dir),
                         manifest=str(cache_dir / "manifest.jsonl"), **{**settings, "batch_size": 3, **overrides})
    dm.setup("fit")
    return dm


def test_latents_mode_serves_latents_and_the_stages_skip_the_encode(precomputed, vae_folder, cache_dir):
    dm = latents_datamodule(precomputed, cache_dir)
    batch = next(iter(dm.train_dataloader()))
    assert batch["video_latents"].shape == batch["control_latents"].shape == (3, 4, 2, 2, 2)
    assert "video" not in batch and batch["text_embeds"].shape == (3, 8, 384)
    assert dm.negative_prompt_embedding()[0].shape == (1, 8, 384)

    class NoEncode:
        def encode(self, video):
            raise AssertionError("precomputed latents must not be encoded again")

    class LatentControlDenoiser(Denoiser):  # takes the VAE latents of the control as they are
        control_channels = 4

    x0, cond = encode_clip_batch(batch, NoEncode(), LatentControlDenoiser())
    assert torch.equal(x0, batch["video_latents"]) and torch.equal(cond.control, batch["control_latents"])
    check_precomputed_latents(dm, str(vae_folder))
    with pytest.raises(ValueError, match=r"do not match this model's VAE None .*vae_sha256"):
        check_precomputed_latents(dm, None)


def test_latents_with_other_clip_settings_are_refused_naming_the_key(precomputed, cache_dir):
    with pytest.raises(ShardError, match=r"train/shard_00000.safetensors: the precomputed latents do not match "
                                         r"the data config .*frame_stride: 2 != 3"):
        latents_datamodule(precomputed, cache_dir, frame_stride=3)
    with pytest.raises(ValueError, match="needs latents_dir"):
        VideoDataModule(mode="latents")


def test_teacher_training_on_precomputed_latents_equals_training_on_clips(cache_dir, tmp_path):
    """In pixel space with float32 storage the latents are the clips themselves, and the
    precomputed train items are the clip items of epoch 0: two steps give the same weights."""
    out = tmp_path / "latents"
    lightning_main([*cli_args("null", out, cache_dir), "--model.init_args.storage_dtype=float32"])
    data = {k: v for k, v in DATA.items() if k not in ("shard_size", "num_examples")}
    common = [
        "fit", "--config", str(REPO / "configs" / "tiny" / "teacher.yaml"), "--trainer.max_steps=2",
        "--trainer.logger=false", "--trainer.callbacks=[]", "--trainer.enable_checkpointing=false",
        "--trainer.limit_val_batches=0", "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false", "--model.init_args.export_dir=null",
        f"--data.cache_dir={cache_dir}",
        f"--data.manifest={cache_dir / 'manifest.jsonl'}", "--data.batch_size=2", "--data.samples_per_epoch=6",
        *[f"--data.{k}={v}" for k, v in data.items()],
    ]
    weights = []
    for mode in (["--data.mode=clips"], ["--data.mode=latents", f"--data.latents_dir={out}"]):
        run_dir = tmp_path / mode[0].removeprefix("--data.mode=")  # one run folder per run
        cli = lightning_main([*common, *mode, f"--trainer.default_root_dir={run_dir}"])
        assert cli.trainer.global_step == 2
        assert isinstance(cli.datamodule.train_set, ClipLatentDataset) == (mode[0] == "--data.mode=latents")
        weights.append({k: v.clone() for k, v in cli.model.denoiser.state_dict().items()})
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
