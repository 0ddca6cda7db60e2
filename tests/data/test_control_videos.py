"""Control videos named in the manifest (``control: video``): checked against their clip at
probe time, read with the clip's window."""

from __future__ import annotations

import json

import decord
import pytest
import torch

from distill_pl.data.clip_reference import ChangedVideoError
from distill_pl.data.clips import ClipDataset, resize_center_crop
from distill_pl.data.manifest import ManifestEntry, read_manifest, write_manifest
from distill_pl.data.pairs import PairShardDataset, ShardError, read_shard_header
from tests.video_files import write_test_video

FRAMES = 40  # enough for a 4-frame window, stride 2, in either split


def manifest_with_control(tmp_path, control_frames: int = FRAMES, control_size: int = 64):
    clip = write_test_video(tmp_path / "videos" / "clip.mp4", FRAMES, size=64, seed=0)
    write_test_video(tmp_path / "depth" / "clip.mp4", control_frames, size=control_size, seed=1)
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text(json.dumps({"path": "videos/clip.mp4", "caption": "a square",
                                    "controls": {"depth": "depth/clip.mp4"}}) + "\n")
    return manifest, clip


def dataset(manifest, **kw):
    return ClipDataset(manifest, num_frames=4, frame_stride=2, height=32, width=32, split="train",
                       val_fraction=0.25, samples_per_epoch=3, control="video", control_key="depth", probe_workers=1, **kw)


@pytest.mark.parametrize("cache_frames", [True, False])
def test_control_frames_are_read_with_the_clip_window(tmp_path, cache_frames):
    manifest, _ = manifest_with_control(tmp_path)
    data = dataset(manifest, cache_frames=cache_frames)
    reader = decord.VideoReader(str(tmp_path / "depth" / "clip.mp4"), ctx=decord.cpu(0))
    for i in range(len(data)):
        item = data[i]
        indices = [item["start"] + 2 * k for k in range(4)]
        expected = resize_center_crop(torch.from_numpy(reader.get_batch(indices).asnumpy()), 32, 32)
        assert torch.equal(item["control"], expected)
        assert not torch.equal(item["control"], item["video"])


def test_a_control_video_of_another_length_is_refused_naming_both_files(tmp_path):
    manifest, clip = manifest_with_control(tmp_path, control_frames=FRAMES - 4)
    with pytest.raises(ValueError) as err:
        dataset(manifest)
    message = str(err.value)
    assert "\n" not in message and str(clip) in message and str(tmp_path / "depth" / "clip.mp4") in message
    assert f"frames {FRAMES - 4} != {FRAMES}" in message


def test_a_control_video_of_another_size_or_missing_is_refused(tmp_path):
    manifest, clip = manifest_with_control(tmp_path, control_size=48)
    with pytest.raises(ValueError, match="height 48 != 64, width 48 != 64"):
        dataset(manifest)
    (tmp_path / "depth" / "clip.mp4").unlink()
    with pytest.raises(ValueError, match=f"control video .*depth/clip.mp4 of {clip}: file not found"):
        dataset(manifest)
    with pytest.raises(ValueError, match="has no control video 'seg'"):
        ClipDataset(manifest, num_frames=4, frame_stride=2, control="video", control_key="seg")


def test_manifest_controls_round_trip(tmp_path):
    manifest, clip = manifest_with_control(tmp_path)
    entries = read_manifest(manifest)
    assert entries == [ManifestEntry(clip, "a square", {"depth": tmp_path / "depth" / "clip.mp4"})]
    copy = write_manifest(tmp_path / "copy.jsonl", entries)
    assert read_manifest(copy) == entries and '"controls": {"depth": "depth/clip.mp4"}' in copy.read_text()
    (tmp_path / "bad.jsonl").write_text(json.dumps({"path": "a.mp4", "caption": "c", "controls": ["x"]}) + "\n")
    with pytest.raises(ValueError, match="line 1: 'controls' must map names to video paths"):
        read_manifest(tmp_path / "bad.jsonl")


def write_split_of(tmp_path, manifest):
    """A train split of 3 KD pairs of ``manifest``'s clip with its depth control video."""
    from tests.data.test_pairs_v2 import write_split

    return write_split(tmp_path / "pairs" / "train", dataset(manifest, cache_frames=False), num_examples=3,
                       shard_size=3, control="video", control_key="depth", height=32, width=32,
                       video_shape=[3, 4, 32, 32])[0]


def test_shards_record_a_non_edge_control():
    from distill_pl.data.clip_reference import ClipSettings
    from distill_pl.data.datamodule import VideoDataModule

    assert "control" not in VideoDataModule().clip_settings()  # edge shards: as before the setting
    settings = VideoDataModule(control="blur").clip_settings()
    assert settings["control"] == "blur" and ClipSettings.from_metadata(settings).controls.control == "blur"
    settings = VideoDataModule(mode="pairs", pairs_dir="pairs", control="video", control_key="depth").clip_settings()
    assert (settings["control"], settings["control_key"]) == ("video", "depth")


def test_kd_pair_shards_reference_the_control_video_and_re_derive_its_frames(tmp_path):
    """Pairs of a clip with a control video: the shard references the control video (path
    and sha256) beside the clip, reading gives the clip data set's control frames (with and
    without the frame cache), and a changed control video is refused naming it."""
    manifest, _ = manifest_with_control(tmp_path)
    clips = dataset(manifest, cache_frames=False)
    layout = write_split_of(tmp_path, manifest)
    meta, _ = read_shard_header(layout.path(0))
    depth = str(tmp_path / "depth" / "clip.mp4")
    assert meta["control_paths"] == [depth] * 3 and depth in meta["video_sha256"]
    for shards in (PairShardDataset(layout.folder), PairShardDataset(layout.folder, cache_frames=True)):
        for i in (2, 0):
            assert torch.equal(shards[i]["control"], clips[i]["control"])
            assert torch.equal(shards[i]["video"], clips[i]["video"])
    write_test_video(tmp_path / "depth" / "clip.mp4", FRAMES, size=64, seed=2)
    with pytest.raises(ChangedVideoError, match=f"{depth}: this video changed since .*shard_00000"):
        PairShardDataset(layout.folder)[0]


def test_a_video_control_shard_without_control_paths_is_refused(tmp_path):
    from distill_pl.data.pairs import check_shard

    manifest, _ = manifest_with_control(tmp_path)
    layout = write_split_of(tmp_path, manifest)
    meta, tensors = read_shard_header(layout.path(0))
    del meta["control_paths"]
    with pytest.raises(ShardError, match="control: video, but control_paths does not have 3 entries"):
        check_shard(layout.path(0), meta, tensors)
