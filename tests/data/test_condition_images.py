"""Conditioning images named in the manifest (``image``, data setting ``control: clip``): they
replace the first frame of the clip's control (the image image-to-video models take), resized
and cropped as the clip's frames are, in the clip data set and in KD pairs read back."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from distill_pl.data.clip_reference import ChangedVideoError
from distill_pl.data.clips import ClipDataset, resize_center_crop
from distill_pl.data.manifest import read_manifest, write_manifest
from distill_pl.data.pairs import PairShardDataset, ShardError, check_shard, read_shard_header
from tests.video_files import write_test_video

FRAMES = 40  # enough for a 4-frame window, stride 2, in either split


def write_image(path, height: int, width: int, seed: int, fmt: str = "PNG"):
    """A random RGB image of ``height`` x ``width`` pixels; returns its uint8 pixels [1, H, W, 3]."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format=fmt)
    return torch.from_numpy(np.asarray(Image.open(path).convert("RGB")).copy())[None]


def manifest_with_image(tmp_path, image: str | None = "images/a.png"):
    """Two clips: ``a`` with the conditioning ``image`` (a 48 x 80 PNG, another aspect than the
    clip's), ``b`` with none."""
    for name, seed in (("a", 0), ("b", 1)):
        write_test_video(tmp_path / "videos" / f"{name}.mp4", FRAMES, size=64, seed=seed)
    lines = [{"path": "videos/a.mp4", "caption": "a square", **({"image": image} if image else {})},
             {"path": "videos/b.mp4", "caption": "another square"}]
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return manifest


def dataset(manifest, control="clip", **kw):
    return ClipDataset(manifest, num_frames=4, frame_stride=2, height=32, width=32, split="train",
                       val_fraction=0.25, samples_per_epoch=4, control=control, probe_workers=1, **kw)


def test_manifest_image_round_trip(tmp_path):
    manifest = manifest_with_image(tmp_path)
    entries = read_manifest(manifest)
    assert entries[0].image == tmp_path / "images" / "a.png" and entries[1].image is None
    copy = write_manifest(tmp_path / "copy.jsonl", entries)
    assert read_manifest(copy) == entries and '"image": "images/a.png"' in copy.read_text()
    (tmp_path / "bad.jsonl").write_text(json.dumps({"path": "a.mp4", "caption": "c", "image": 3}) + "\n")
    with pytest.raises(ValueError, match="line 1: 'image' must be an image path"):
        read_manifest(tmp_path / "bad.jsonl")


@pytest.mark.parametrize("cache_frames", [True, False])
def test_the_image_replaces_the_first_control_frame_resized_like_the_clip(tmp_path, cache_frames):
    manifest = manifest_with_image(tmp_path)
    image = resize_center_crop(write_image(tmp_path / "images" / "a.png", 48, 80, seed=5), 32, 32)
    data = dataset(manifest, cache_frames=cache_frames)
    seen = set()
    for i in range(len(data)):
        item = data[i]
        seen.add(item["path"])
        if item["path"].endswith("a.mp4"):
            assert item["image_path"] == str(tmp_path / "images" / "a.png")
            assert torch.equal(item["control"][:, :1], image)
            assert not torch.equal(item["video"][:, :1], image)  # the clip keeps its own frames
        else:
            assert item["image_path"] == "" and torch.equal(item["control"][:, :1], item["video"][:, :1])
        assert torch.equal(item["control"][:, 1:], item["video"][:, 1:])
    assert len(seen) == 2
    edge = dataset(manifest, control="edge")[0]  # another control: the key is ignored
    assert "image_path" not in edge


def test_a_jpeg_image_is_read_too(tmp_path):
    manifest = manifest_with_image(tmp_path, image="images/a.jpg")
    image = resize_center_crop(write_image(tmp_path / "images" / "a.jpg", 64, 64, seed=6, fmt="JPEG"), 32, 32)
    data = dataset(manifest)
    item = next(data[i] for i in range(len(data)) if data[i]["image_path"])
    assert torch.equal(item["control"][:, :1], image)


def test_a_missing_or_unreadable_image_is_one_line_naming_manifest_clip_and_key(tmp_path):
    manifest = manifest_with_image(tmp_path)
    clip = tmp_path / "videos" / "a.mp4"
    with pytest.raises(ValueError) as err:
        dataset(manifest)
    message = str(err.value)
    assert "\n" not in message and message == (f"manifest {manifest}: the 'image' of {clip}, "
                                               f"{tmp_path / 'images' / 'a.png'}: file not found")
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.png").write_text("not an image")
    with pytest.raises(ValueError, match=rf"manifest .*: the 'image' of .*a.mp4, .*a.png: unreadable image \(") as err:
        dataset(manifest)
    assert "\n" not in str(err.value)
    dataset(manifest, control="edge")  # only control: clip reads it


def write_split_of(tmp_path, clips):
    """A train split of 4 KD pairs of ``clips``, whose rows reference the images as the pair
    generation does."""
    from distill_pl.data.pairs import ShardLayout, build_pair_shard, write_shard
    from tests.data.test_pairs_v2 import common, example_rows

    layout = ShardLayout(tmp_path / "pairs" / "train", 4, 4)
    rows = [dict(row, image_path=clips[i]["image_path"]) for i, row in enumerate(example_rows(clips, range(4)))]
    settings = common(4, 4, control="clip", control_key=None, height=32, width=32, num_frames=4,
                      video_shape=[3, 4, 32, 32])
    negative = (torch.zeros(1, 6, 8), torch.zeros(1, 6, dtype=torch.bool))
    tensors, metadata = build_pair_shard(rows, settings, negative)
    metadata.update(shard_index=0, count=4, first_index=0)
    write_shard(layout.path(0), tensors, metadata)
    return layout


def test_kd_pairs_reference_the_image_and_read_it_back(tmp_path):
    """The shard lists each row's image ("" for none) with its sha256; reading gives the clip
    data set's control (with and without the frame cache); a changed image is refused."""
    manifest = manifest_with_image(tmp_path)
    image = tmp_path / "images" / "a.png"
    write_image(image, 48, 80, seed=5)
    clips = dataset(manifest, cache_frames=False)
    layout = write_split_of(tmp_path, clips)
    meta, tensors = read_shard_header(layout.path(0))
    assert sorted(set(meta["image_paths"])) == ["", str(image)] and str(image) in meta["video_sha256"]
    for shards in (PairShardDataset(layout.folder), PairShardDataset(layout.folder, cache_frames=True)):
        for i in (3, 0, 1, 2):
            assert torch.equal(shards[i]["control"], clips[i]["control"])
            assert torch.equal(shards[i]["video"], clips[i]["video"])
    bad = dict(meta, image_paths=meta["image_paths"][:3])
    with pytest.raises(ShardError, match="image_paths does not have 4 entries"):
        check_shard(layout.path(0), bad, tensors)
    write_image(image, 48, 80, seed=7)
    with pytest.raises(ChangedVideoError, match=f"{image}: this video changed since .*shard_00000"):
        [PairShardDataset(layout.folder)[i] for i in range(4)]


def test_pairs_without_images_are_written_as_before(tmp_path):
    manifest = manifest_with_image(tmp_path, image=None)
    layout = write_split_of(tmp_path, dataset(manifest, cache_frames=False))
    assert "image_paths" not in read_shard_header(layout.path(0))[0]
