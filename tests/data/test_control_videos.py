"""Control videos named in the manifest (``control: video``): checked against their clip at
probe time, read with the clip's window."""

from __future__ import annotations

import json

import decord
import pytest
import torch

from distill_pl.data.clips import ClipDataset, resize_center_crop
from distill_pl.data.manifest import ManifestEntry, read_manifest, write_manifest
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


def test_pairs_refuse_control_videos_and_shards_record_a_non_edge_control():
    from distill_pl.data.clip_reference import ClipSettings
    from distill_pl.data.datamodule import VideoDataModule

    with pytest.raises(ValueError, match="control: video cannot make KD pairs"):
        VideoDataModule(mode="pairs", pairs_dir="pairs", control="video", control_key="depth")
    assert "control" not in VideoDataModule().clip_settings()  # edge shards: as before the setting
    settings = VideoDataModule(control="blur").clip_settings()
    assert settings["control"] == "blur" and ClipSettings.from_metadata(settings).controls.control == "blur"
