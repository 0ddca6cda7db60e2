"""KD pair generation through the real CLI: contents, reruns, kill + rerun, rank split."""

import contextlib
import io
import os
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import lightning
import pytest
import torch

from distill_pl.cli.main import lightning_main
from distill_pl.data.bundled import BUNDLED_CLIPS, caption_for
from distill_pl.data.clips import ClipDataset
from distill_pl.data.datamodule import VideoDataModule
from distill_pl.data.manifest import ManifestEntry, write_manifest
from distill_pl.data.pairs import PairShardDataset, ShardError, read_shard_header, teacher_fingerprint
from distill_pl.diffusion.sampling import sample_with_scheduler
from distill_pl.models.conditioning import Conditioning
from distill_pl.models.guidance import negative_conditioning, velocity_fn
from distill_pl.export.model_folders import load_scheduler, save_teacher_folder
from distill_pl.families.registry import build_denoiser, load_denoiser
from distill_pl.families.wan.adapter import WanDenoiser
from distill_pl.util.paths import resolve_path
from distill_pl.training import kd_pairs
from distill_pl.training.kd_pairs import KDPairGenerationModule
from tests.cli_helpers import cli_command, kill_at_first_shard

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "configs" / "tiny" / "kd_pairs.yaml"
STEPS = 4
# two small bundled videos (176x144, quick to decode); 6 train examples (3 shards) and
# 4 val windows (2 shards), one example per batch
VIDEOS = ("carphone_pristine", "carphone_distorted")
DATA = dict(num_examples=6, shard_size=2, batch_size=1, num_frames=4, frame_stride=2, height=16,
            width=16, val_clips_per_video=2, max_text_length=8)
TEACHER = dict(patch_size=[1, 4, 4], num_attention_heads=2, attention_head_dim=12, in_channels=6,
               out_channels=3, text_dim=384, freq_dim=16, ffn_dim=32, num_layers=1, rope_max_seq_len=32)


pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/training/conftest.py


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("teacher")
    return save_teacher_folder(folder, build_denoiser("WanTransformer3DModel", TEACHER), "unipc", 1.0)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    """Prompt-embedding cache, with the manifest of the test videos in it."""
    folder = tmp_path_factory.mktemp("cache")
    videos = resolve_path(BUNDLED_CLIPS)
    write_manifest(folder / "manifest.jsonl", [ManifestEntry(videos / f"{v}.mp4", caption_for(Path(v))) for v in VIDEOS])
    return folder


def cli_args(teacher: Path, out: Path, cache_dir: Path, **overrides) -> list[str]:
    model = {"teacher": teacher, "num_steps": STEPS, **{k: v for k, v in overrides.items() if k in ("guidance", "seed")}}
    data = {**DATA, **{k: v for k, v in overrides.items() if k not in model}}
    return [
        "predict", "--config", str(CONFIG),
        *[f"--model.init_args.{k}={v}" for k, v in model.items()],
        f"--data.pairs_dir={out}", f"--data.cache_dir={cache_dir}", f"--trainer.default_root_dir={out}",
        f"--data.manifest={cache_dir / 'manifest.jsonl'}",
        "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
        *[f"--data.{k}={v}" for k, v in data.items()],
    ]


@pytest.fixture(scope="module")
def generated(teacher, cache_dir, tmp_path_factory) -> Path:
    """An uninterrupted generation, run in this process."""
    out = tmp_path_factory.mktemp("pairs")
    log = io.StringIO()  # not a terminal: the writer prints a line per shard
    with contextlib.redirect_stdout(log):
        lightning_main(cli_args(teacher, out, cache_dir))
    (out.parent / f"{out.name}.log").write_text(log.getvalue())
    return out


def test_a_line_per_written_shard_with_rate_and_eta(generated):
    lines = [line for line in (generated.parent / f"{generated.name}.log").read_text().splitlines()
             if line.startswith("KD pairs: wrote")]
    assert [line.split()[3] for line in lines] == [
        "train/shard_00000.safetensors", "train/shard_00001.safetensors", "train/shard_00002.safetensors",
        "val/shard_00000.safetensors", "val/shard_00001.safetensors"]
    assert "(2/10 examples)" in lines[0] and "examples/s" in lines[0] and "ETA" in lines[0]
    assert "(10/10 examples)" in lines[-1] and lines[-1].endswith("ETA 0s")


def shard_files(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*.safetensors"))}


def test_shards_hold_the_teacher_samples_and_metadata(generated, teacher, cache_dir):
    files = sorted(str(p.relative_to(generated)) for p in generated.rglob("*") if p.is_file())
    assert files == ["config.yaml", *[f"train/shard_0000{k}.safetensors" for k in range(3)],
                     "val/shard_00000.safetensors", "val/shard_00001.safetensors"]
    meta, _ = read_shard_header(generated / "train" / "shard_00001.safetensors")
    assert meta["teacher"] == str(teacher.resolve()) and meta["teacher_sha256"] == teacher_fingerprint(teacher)
    assert (meta["num_steps"], meta["guidance"], meta["scheduler"], meta["seed"]) == (STEPS, 8.0, "UniPCMultistepScheduler", 0)
    assert (meta["split"], meta["shard_index"], meta["first_index"], meta["count"], meta["num_examples"]) == ("train", 1, 2, 2, 6)
    assert meta["latent_shape"] == meta["video_shape"] == [3, 4, 16, 16] and meta["text_shape"] == [8, 384]
    assert (meta["num_frames"], meta["frame_stride"], meta["height"], meta["width"]) == (4, 2, 16, 16)

    clips = ClipDataset(cache_dir / "manifest.jsonl", 4, 2, 16, 16, split="train", val_fraction=0.25)
    train = PairShardDataset(generated / "train")
    assert meta["captions"] == [train[2]["caption"], train[3]["caption"]]
    model = load_denoiser(str(teacher)).eval()
    for i in range(6):
        item = train[i]
        assert item["index"] == i and item["seed"] == i
        assert torch.equal(item["noise"], torch.randn(3, 4, 16, 16, generator=torch.Generator().manual_seed(i)))
        clip = clips[i]
        assert item["caption"] == clip["caption"]
        assert torch.equal(item["video"], clip["video"]) and torch.equal(item["control"], clip["control"])
    # the teacher output is the N-step CFG sample from the stored noise and conditioning
    negative = train.negative_prompt_embedding()
    cond = Conditioning(item["text_embeds"][None], item["text_mask"][None], item["control"][None])
    fn = velocity_fn(model, cond, negative_conditioning(cond, *negative), 8.0)
    expected = sample_with_scheduler(fn, item["noise"][None], load_scheduler(teacher), STEPS,
                                     step_sigma=model.sampler_sigma)[0]
    torch.testing.assert_close(item["teacher_output"], expected)
    assert not torch.allclose(item["teacher_output"], item["noise"])
    val = PairShardDataset(generated / "val")
    assert len(val) == 4 and val[3]["seed"] == 1_000_000_003


def test_noise_from_seed_and_teacher_trajectory_are_the_generations(teacher, cache_dir, tmp_path, monkeypatch):
    """The noise a v2 pair regenerates from its seed is bit for bit the noise the teacher
    sampled from; each stored trajectory state is the sampler's state at the first step with
    sigma <= the level."""
    drawn = []
    sample = kd_pairs.sample_with_scheduler

    def recording(fn, noise, *args, **kwargs):
        drawn.append(noise.clone())
        return sample(fn, noise, *args, **kwargs)

    monkeypatch.setattr(kd_pairs, "sample_with_scheduler", recording)
    out = tmp_path / "pairs"
    levels = [0.75, 0.5, 0.25]
    lightning_main([*cli_args(teacher, out, cache_dir, num_examples=2, num_val_examples=1),
                    f"--model.init_args.trajectory_sigmas={levels}", "--model.init_args.num_steps=8"])
    train = PairShardDataset(out / "train")
    assert train.metadata["trajectory_sigmas"] == levels
    assert [train[i]["noise"].tolist() for i in range(2)] == [d[0].tolist() for d in drawn[:2]]
    assert all(torch.equal(train[i]["noise"], drawn[i][0]) for i in range(2))

    item = train[1]
    model = WanDenoiser(path=str(teacher)).eval()
    cond = Conditioning(item["text_embeds"][None], item["text_mask"][None], item["control"][None])
    fn = velocity_fn(model, cond, negative_conditioning(cond, *train.negative_prompt_embedding()), 8.0)
    scheduler = load_scheduler(teacher)
    scheduler.set_timesteps(8)
    x, states = item["noise"][None], []
    with torch.no_grad():
        for t, s in zip(scheduler.timesteps, scheduler.sigmas):
            states.append((float(s), x))
            x = scheduler.step(fn(x, model.sampler_sigma(t, s).expand(1)), t, x, return_dict=False)[0]
    steps = [next(i for i, (s, _) in enumerate(states) if s <= level) for level in levels]
    assert steps == sorted(set(steps)) and steps[0] > 0
    assert item["teacher_trajectory"].shape == (3, 3, 4, 16, 16)
    for j, i in enumerate(steps):
        assert float(item["trajectory_sigmas"][j]) == pytest.approx(states[i][0], abs=1e-6)
        torch.testing.assert_close(item["teacher_trajectory"][j], states[i][1][0])
    torch.testing.assert_close(item["teacher_output"], x[0])


def test_few_step_kd_trains_on_the_trajectory_of_generated_pairs(teacher, cache_dir, tmp_path):
    """Pairs generated with trajectory levels feed a K-step KDModule through the datamodule:
    the batch holds one state per stored level, the module picks the student's own levels
    among them (a 2-step student uses the middle one, a 4-step one all three) and its loss is
    the objective's on exactly those states; a student level the pairs lack is a clear error."""
    from distill_pl.methods.kd import KDObjective
    from distill_pl.training.kd import KDModule

    out = tmp_path / "pairs"
    levels = [0.75, 0.5, 0.25]  # the teacher's shift is 1: the student's levels are its sigmas
    lightning_main([*cli_args(teacher, out, cache_dir, num_examples=2, num_val_examples=1, batch_size=2),
                    f"--model.init_args.trajectory_sigmas={levels}", "--model.init_args.num_steps=8"])
    dm = VideoDataModule(mode="pairs", pairs_dir=str(out), cache_dir=str(cache_dir),
                         manifest=str(cache_dir / "manifest.jsonl"), **{**DATA, "num_examples": 2, "batch_size": 2})
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["teacher_trajectory"].shape == (2, 3, 3, 4, 16, 16)
    assert batch["trajectory_sigmas"].shape == (2, 3)
    assert (batch["trajectory_sigmas"] <= torch.tensor(levels)).all()

    for sigmas, columns in (([1.0, 0.5], [1]), ([1.0, *levels], [0, 1, 2])):
        kd = KDModule(str(teacher), student_sigmas=sigmas)
        kd.check_pairs_metadata(dm.pairs_metadata)
        assert kd.trajectory_columns == columns
        noise, target, cond = kd.pair_inputs(batch)
        with torch.no_grad():
            loss = kd.phase_loss(0, batch)[0]
            expected = KDObjective(kd.student, kd.student_levels).loss(
                noise, target, cond, batch["teacher_trajectory"][:, columns], batch["trajectory_sigmas"][:, columns])
        assert torch.isfinite(loss) and loss.item() == pytest.approx(expected.item(), rel=1e-6)

    with pytest.raises(ValueError, match=r"needs the teacher's trajectory at its levels \[0.6\].*trajectory_sigmas"):
        KDModule(str(teacher), student_sigmas=[1.0, 0.6]).check_pairs_metadata(dm.pairs_metadata)


def test_rerun_of_a_finished_generation_does_no_teacher_work(generated, teacher, cache_dir, tmp_path, monkeypatch):
    out = tmp_path / "pairs"
    shutil.copytree(generated, out)
    before = shard_files(out)

    def no_teacher(*args, **kwargs):
        raise AssertionError("a finished shard must not be generated again")

    monkeypatch.setattr(WanDenoiser, "forward", no_teacher)
    cli = lightning_main(cli_args(teacher, out, cache_dir))
    assert cli.trainer.predict_loop.predictions == []
    assert shard_files(out) == before


def test_rerun_with_other_settings_names_the_finished_shard(generated, teacher, cache_dir, tmp_path):
    out = tmp_path / "pairs"
    shutil.copytree(generated, out)
    with pytest.raises(ShardError, match=r"train/shard_00000.safetensors: .*other settings.*guidance: 8.0 != 5.0"):
        lightning_main(cli_args(teacher, out, cache_dir, guidance=5.0))


def test_killed_generation_completes_bit_identical_on_rerun(generated, teacher, cache_dir, tmp_path):
    out = tmp_path / "pairs"
    args = cli_args(teacher, out, cache_dir)
    kill_at_first_shard(args, out, tmp_path / "killed_run.log")
    killed = shard_files(out)
    assert 0 < len(killed) < 5, "the run finished before it was killed; the test needs a slower generation"
    expected = shard_files(generated)
    for name, data in killed.items():
        assert data == expected[name], name

    # the rerun (in this process, to save a second start-up) keeps the finished shards as they
    # are and removes temp files a kill during a write would leave
    stamps = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.rglob("shard_*.safetensors")}
    (out / "val").mkdir(parents=True, exist_ok=True)
    (out / "val" / ".shard_00001.safetensors.tmp").write_bytes(b"half a shard")
    lightning_main(args)
    assert shard_files(out) == expected
    assert all((p.stat().st_ino, p.stat().st_mtime_ns) == stamp for p, stamp in stamps.items())
    leftovers = [p.name for p in out.rglob("*") if p.is_file() and p.suffix not in (".safetensors", ".yaml")]
    assert leftovers == []


class FakeModule:
    def pair_generation_metadata(self) -> dict:
        return {"teacher_sha256": "x"}


def test_predict_dataloader_gives_each_rank_its_shards_in_shard_aligned_batches(cache_dir, tmp_path, generated):
    settings = dict(DATA, num_examples=10, shard_size=4, batch_size=2)
    dm = VideoDataModule(mode="pairs", pairs_dir=str(tmp_path), cache_dir=str(cache_dir),
                         manifest=str(cache_dir / "manifest.jsonl"), **settings)
    dm.setup("predict")

    def loaders(rank: int, world: int, distributed_sampler: bool = False, **overrides):
        dm.hparams.update({**settings, "num_val_examples": None, **overrides})
        dm.trainer = SimpleNamespace(
            global_rank=rank, world_size=world, lightning_module=FakeModule(),
            _accelerator_connector=SimpleNamespace(use_distributed_sampler=distributed_sampler),
        )
        return dm.predict_dataloader()

    def batches(loader) -> list[list[int]]:
        """Example indices of each batch (without decoding the clips)."""
        return [[loader.dataset.indices[p] for p in positions] for positions in loader.batch_sampler]

    train, val = loaders(0, 2)
    assert batches(train) == [[0, 1], [2, 3], [8, 9]]  # shards 0 and 2
    assert batches(val) == [[0, 1], [2, 3]]
    batch = next(iter(train))
    assert batch["split"] == ["train", "train"] and batch["text_embeds"].shape == (2, 8, 384)
    train, val = loaders(1, 2)
    assert batches(train) == [[4, 5], [6, 7]] and batches(val) == []
    with pytest.raises(ValueError, match="multiple of batch_size"):
        loaders(0, 1, shard_size=3)
    with pytest.raises(ValueError, match="use_distributed_sampler: false"):
        loaders(0, 2, distributed_sampler=True)
    with pytest.raises(ValueError, match=r"num_val_examples=9 but there are only 4 val windows \(2 videos"):
        loaders(0, 1, num_val_examples=9)


def test_generation_needs_the_shard_writer(teacher, cache_dir, tmp_path):
    module = KDPairGenerationModule(str(teacher), num_steps=1)
    dm = VideoDataModule(mode="pairs", pairs_dir=str(tmp_path), cache_dir=str(cache_dir),
                         manifest=str(cache_dir / "manifest.jsonl"), **DATA)
    trainer = lightning.Trainer(logger=False, enable_progress_bar=False, accelerator="cpu", use_distributed_sampler=False)
    with pytest.raises(ValueError, match="add distill_pl.callbacks.shard_writer.PairShardWriter"):
        trainer.predict(module, datamodule=dm)


@pytest.mark.slow
def test_two_ranks_write_the_same_shards_as_one(generated, teacher, cache_dir, tmp_path):
    out = tmp_path / "pairs"
    args = [*cli_args(teacher, out, cache_dir), "--trainer.devices=2", "--trainer.strategy=ddp"]
    run = subprocess.run([*cli_command(), *args], cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"},
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:]
    assert "to generate on 2 ranks" in run.stdout
    assert shard_files(out) == shard_files(generated)
