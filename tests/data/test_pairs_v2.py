"""KD pair shards, format version 2: compact storage, noise from the seed, clips by reference."""

import shutil
from pathlib import Path

import pytest
import torch

from distill_pl.data.bundled import BUNDLED_CLIPS
from distill_pl.data.clip_reference import ChangedVideoError
from distill_pl.data.clips import ClipDataset
from distill_pl.data.manifest import ManifestEntry, write_manifest
from distill_pl.data.pairs import (
    PairShardDataset,
    ShardError,
    ShardLayout,
    build_pair_shard,
    example_noise,
    noise_fingerprint,
    read_shard_header,
    write_shard,
)
from distill_pl.util.paths import resolve_path

FRAMES, STRIDE, SIZE, LENGTH, DIM = 4, 2, 16, 6, 8
LATENT = (3, FRAMES, SIZE, SIZE)


@pytest.fixture()
def clips(tmp_path) -> ClipDataset:
    """Train clips of a private copy of a bundled video (so a test can change the file)."""
    video = tmp_path / "videos" / "carphone.mp4"
    video.parent.mkdir()
    shutil.copy(resolve_path(BUNDLED_CLIPS) / "carphone_pristine.mp4", video)
    manifest = write_manifest(tmp_path / "manifest.jsonl", [ManifestEntry(video, "a man in a car")])
    return ClipDataset(manifest, FRAMES, STRIDE, SIZE, SIZE, split="train", val_fraction=0.25, cache_frames=False)


def common(num_examples: int, shard_size: int, **overrides) -> dict:
    return {
        "split": "train", "num_examples": num_examples, "shard_size": shard_size,
        "teacher": "/teachers/a", "teacher_sha256": "aa" * 32, "num_steps": 4, "guidance": 8.0,
        "scheduler": "UniPCMultistepScheduler", "seed": 0, "video_shape": [3, FRAMES, SIZE, SIZE],
        "num_frames": FRAMES, "frame_stride": STRIDE, "height": SIZE, "width": SIZE,
        "canny_low": 0.2, "canny_high": 0.4, "storage_dtype": "bfloat16", "trajectory_sigmas": [],
        **overrides,
    }


def example_rows(clips: ClipDataset, indices: range, levels: int = 0) -> list[dict]:
    """Rows as the pair generation makes them: two prompts alternating, random outputs."""
    g = torch.Generator().manual_seed(1)
    rows = []
    for i in indices:
        prompt = f"prompt {i % 2}"
        embeds = torch.full((LENGTH, DIM), 0.1 + i % 2) + 0.01 * torch.arange(DIM)
        row = {
            "teacher_output": torch.randn(LATENT, generator=g), "text_embeds": embeds,
            "text_mask": torch.arange(LENGTH) < 3 + i % 2, "seed": torch.tensor(100 + i),
            "index": torch.tensor(i), "start": torch.tensor(clips.window(i)[1]),
            "noise_sha256": noise_fingerprint(example_noise(100 + i, LATENT)),
            "caption": prompt, "path": str(clips.window(i)[0].path),
        }
        if clips.window(i)[0].control is not None:  # control: video
            row["control_path"] = str(clips.window(i)[0].control)
        if levels:
            row["teacher_trajectory"] = torch.randn(levels, *LATENT, generator=g)
            row["trajectory_sigmas"] = torch.linspace(0.7, 0.2, levels)
        rows.append(row)
    return rows


def write_split(folder: Path, clips: ClipDataset, num_examples: int = 6, shard_size: int = 4, levels: int = 0,
                **overrides) -> tuple[ShardLayout, list[dict]]:
    layout = ShardLayout(folder, num_examples, shard_size)
    negative = (torch.zeros(1, LENGTH, DIM), torch.zeros(1, LENGTH, dtype=torch.bool))
    settings = common(num_examples, shard_size, trajectory_sigmas=[0.75, 0.25][:levels], **overrides)
    all_rows = []
    for k in range(layout.num_shards):
        rows = example_rows(clips, layout.examples(k), levels)
        tensors, metadata = build_pair_shard(rows, settings, negative)
        metadata.update(shard_index=k, count=len(rows), first_index=layout.examples(k).start)
        write_shard(layout.path(k), tensors, metadata)
        all_rows += rows
    return layout, all_rows


def test_v2_blur_control_is_re_derived_from_the_reference(tmp_path, clips):
    blur = ClipDataset(clips.manifest, FRAMES, STRIDE, SIZE, SIZE, split="train", val_fraction=0.25,
                       cache_frames=False, control="blur")
    layout, _ = write_split(tmp_path / "train", blur, control="blur", control_key=None)
    for ds in (PairShardDataset(layout.folder), PairShardDataset(layout.folder, cache_frames=True)):
        assert ds.metadata["control"] == "blur"
        for i in (5, 0):
            assert torch.equal(ds[i]["control"], blur[i]["control"])
    assert not torch.equal(blur[0]["control"], clips[0]["control"])


def test_v2_round_trip(tmp_path, clips):
    layout, rows = write_split(tmp_path / "train", clips)
    meta, tensors = read_shard_header(layout.path(0))
    assert meta["format_version"] == 2 and meta["text_prompts"] == ["prompt 0", "prompt 1"]
    assert tensors["teacher_output"] == ([4, *LATENT], "BF16") and tensors["text_table_embeds"] == ([2, LENGTH, DIM], "BF16")
    assert "noise" not in tensors and "video" not in tensors and "control" not in tensors
    ds = PairShardDataset(layout.folder)
    assert len(ds) == 6 and ds.metadata["storage_dtype"] == "bfloat16"
    for i, row in enumerate(rows):
        item = ds[i]
        assert set(item) == {"noise", "teacher_output", "control", "video", "text_embeds", "text_mask",
                             "caption", "seed", "index"}
        assert torch.equal(item["teacher_output"], row["teacher_output"].bfloat16().float())
        assert item["teacher_output"].dtype == torch.float32
        assert torch.equal(item["text_embeds"], row["text_embeds"].bfloat16().float())
        assert torch.equal(item["text_mask"], row["text_mask"])
        assert (item["caption"], item["seed"], item["index"]) == (row["caption"], 100 + i, i)
        assert torch.equal(item["noise"], example_noise(100 + i, LATENT))
        clip = clips[i]  # the clip and its control, re-derived from the reference
        assert torch.equal(item["video"], clip["video"]) and torch.equal(item["control"], clip["control"])
    cached = PairShardDataset(layout.folder, cache_frames=True)  # whole video decoded once
    for i in (5, 0):
        assert torch.equal(cached[i]["video"], ds[i]["video"]) and torch.equal(cached[i]["control"], ds[i]["control"])
    # the same inputs give the same bytes
    again, _ = write_split(tmp_path / "again", clips)
    assert all(layout.path(k).read_bytes() == again.path(k).read_bytes() for k in range(layout.num_shards))


def test_v2_trajectory_round_trip(tmp_path, clips):
    layout, rows = write_split(tmp_path / "train", clips, num_examples=4, levels=2, storage_dtype="float32")
    ds = PairShardDataset(layout.folder)
    item = ds[3]
    assert item["teacher_trajectory"].shape == (2, *LATENT)
    assert torch.equal(item["teacher_trajectory"], rows[3]["teacher_trajectory"])
    assert torch.equal(item["trajectory_sigmas"], rows[3]["trajectory_sigmas"])
    batch = torch.utils.data.default_collate([ds[0], ds[1]])
    assert batch["teacher_trajectory"].shape == (2, 2, *LATENT) and batch["trajectory_sigmas"].shape == (2, 2)


def test_a_changed_or_missing_referenced_video_is_refused_by_name(tmp_path, clips):
    layout, _ = write_split(tmp_path / "train", clips)
    ds = PairShardDataset(layout.folder)
    ds[0]
    video = Path(clips.videos[0].path)
    with open(video, "ab") as f:
        f.write(b"\0")
    with pytest.raises(ChangedVideoError, match=rf"{video}: this video changed since .*shard_00000.safetensors"):
        ds[1]
    video.unlink()
    with pytest.raises(ChangedVideoError, match=rf"{video}: referenced by .*shard_00001.safetensors.*missing"):
        ds[5]


def test_noise_that_does_not_match_its_hash_is_refused(tmp_path, clips, monkeypatch):
    layout, _ = write_split(tmp_path / "train", clips, num_examples=4)
    ds = PairShardDataset(layout.folder)
    from distill_pl.data import pairs

    monkeypatch.setattr(pairs, "example_noise", lambda seed, shape: torch.zeros(shape))
    with pytest.raises(ShardError, match=r"shard_00000.safetensors: row 2: the noise regenerated from seed 102"):
        ds[2]


def test_v2_header_is_checked(tmp_path, clips):
    layout, _ = write_split(tmp_path / "train", clips, num_examples=4)
    meta, tensors = read_shard_header(layout.path(0))
    from distill_pl.data.pairs import check_shard

    with pytest.raises(ShardError, match="video_sha256 lacks the referenced videos"):
        check_shard(layout.path(0), {**meta, "video_sha256": {}}, tensors)
    with pytest.raises(ShardError, match=r"tensor text_table_embeds is BF16 \[2, 6, 8\], expected BF16 \[3"):
        check_shard(layout.path(0), {**meta, "text_prompts": ["a", "b", "c"]}, tensors)
    with pytest.raises(ShardError, match="format version 3"):
        check_shard(layout.path(0), {**meta, "format_version": 3}, tensors)
