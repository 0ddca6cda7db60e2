import logging
import os
import shutil
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from distill_pl.data.bundled import BUNDLED_CLIPS, write_bundled_manifest
from distill_pl.data.clips import ClipDataset, open_video, resize_center_crop
from distill_pl.data.manifest import ManifestEntry, read_manifest, write_manifest
from distill_pl.util.paths import resolve_path

CLIPS = resolve_path(BUNDLED_CLIPS)


def one_video_manifest(tmp_path: Path, video: Path) -> Path:
    return write_manifest(tmp_path / "manifest.jsonl", [ManifestEntry(video, "a caption")])


def pyav_frames(path: Path, count: int) -> np.ndarray:
    """The first ``count`` frames [count, H, W, 3] uint8 RGB, decoded with PyAV (not decord)."""
    with av.open(str(path)) as container:
        frames = [f.to_ndarray(format="rgb24") for f, _ in zip(container.decode(video=0), range(count))]
    return np.stack(frames)


def write_short_video(path: Path, frames: int) -> Path:
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=25)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for i in range(frames):
            image = np.full((32, 32, 3), 20 * i, np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode())
    return path


def test_frames_match_pyav_in_order(tmp_path):
    video = CLIPS / "carphone_pristine.mp4"  # 120 frames 144x176; neighbours differ by >1.6 on average
    stride = 3
    # full resolution: the resize is the identity, so frames compare pixel by pixel
    ds = ClipDataset(
        one_video_manifest(tmp_path, video), num_frames=4, frame_stride=stride,
        height=144, width=176, samples_per_epoch=3, seed=1,
    )
    items = [ds[i] for i in range(len(ds))]
    reference = pyav_frames(video, max(item["start"] for item in items) + ds.span + 2)
    boundary = 120 - round(120 * 0.2)
    for item in items:
        clip = item["video"]
        assert clip.shape == (3, 4, 144, 176) and clip.dtype == torch.float32
        assert clip.min() >= -1 and clip.max() <= 1 and clip.min() < -0.5 and clip.max() > 0.5
        assert item["control"].shape == clip.shape
        assert item["path"] == str(video) and item["caption"] == "a caption"
        start = item["start"]
        assert 0 <= start and start + ds.span <= boundary
        pixels = ((clip.permute(1, 2, 3, 0) + 1) * 127.5).numpy()
        for k in range(4):
            index = start + stride * k
            neighbours = range(max(0, index - 2), index + 3)
            errors = {j: np.abs(pixels[k] - reference[j]).mean() for j in neighbours}
            assert min(errors, key=errors.get) == index, (k, errors)
            assert errors[index] < 1.0


def test_resize_covers_and_crops_the_center():
    frame = np.zeros((1, 40, 120, 3), np.uint8)  # thirds: red | green | blue
    frame[:, :, :40, 0] = frame[:, :, 40:80, 1] = frame[:, :, 80:, 2] = 255
    out = resize_center_crop(torch.from_numpy(frame), 20, 20)  # scaled to 20x60, cols 20..40 kept
    assert out.shape == (3, 1, 20, 20)
    assert torch.allclose(out[:, 0, :, 2:18], torch.tensor([-1.0, 1.0, -1.0])[:, None, None], atol=1e-5)
    portrait = resize_center_crop(torch.from_numpy(frame), 30, 10)  # height covers: 30x90
    assert portrait.shape == (3, 1, 30, 10) and (portrait[1] > 0.99).all()


def test_split_windows_are_disjoint_and_deterministic(tmp_path):
    manifest = write_bundled_manifest(tmp_path)
    train = ClipDataset(manifest, samples_per_epoch=64, seed=3, val_fraction=0.25)
    val = ClipDataset(manifest, split="val", val_fraction=0.25, seed=3)
    assert len(train) == 64 and len(val) == 4 * 2 and not train.skipped and not val.skipped
    frame_counts = {v.path: len(open_video(v.path)) for v in val.videos}
    last_train_frame, first_val_frame = {}, {}
    for i in range(len(train)):
        video, start = train.window(i)
        last_train_frame[video.path] = max(last_train_frame.get(video.path, -1), start + train.span - 1)
    for i in range(len(val)):
        video, start = val.window(i)
        assert start + val.span <= frame_counts[video.path]
        first_val_frame[video.path] = min(first_val_frame.get(video.path, 10**9), start)
    for path, last in last_train_frame.items():
        boundary = frame_counts[path] - round(frame_counts[path] * 0.25)
        assert last < boundary <= first_val_frame[path]
    # val: two fixed starts per video, the first and last window of the held-out part
    for v in range(4):
        (video, first), (_, last) = val.window(2 * v), val.window(2 * v + 1)
        assert last + val.span == frame_counts[video.path] and first < last

    # every 4 consecutive items take the 4 videos, in a seeded order
    orders = [tuple(train.window(i)[0].path for i in range(k, k + 4)) for k in range(0, 64, 4)]
    assert all(sorted(order) == sorted(v.path for v in train.videos) for order in orders)
    assert len(set(orders)) > 1
    starts = [train.window(i)[1] for i in range(64)]
    same_seed = ClipDataset(manifest, samples_per_epoch=64, seed=3, val_fraction=0.25)
    assert [same_seed.window(i)[1] for i in range(64)] == starts
    train.set_epoch(1)
    assert [train.window(i)[1] for i in range(64)] != starts
    train.set_epoch(0)
    assert [train.window(i)[1] for i in range(64)] == starts


def test_bad_files_are_skipped_with_reasons(tmp_path, caplog):
    good = CLIPS / "carphone_distorted.mp4"
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(np.random.default_rng(0).bytes(5000))
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes((CLIPS / "bikes.mp4").read_bytes()[:2048])
    short = write_short_video(tmp_path / "short.mp4", frames=10)
    missing = tmp_path / "missing.mp4"
    entries = [ManifestEntry(p, p.stem) for p in (good, missing, corrupt, truncated, short)]
    manifest = write_manifest(tmp_path / "manifest.jsonl", entries)
    with caplog.at_level(logging.WARNING, logger="distill_pl.data"):
        ds = ClipDataset(manifest, num_frames=4, frame_stride=4)
    assert [v.path for v in ds.videos] == [good]
    reasons = dict(ds.skipped)
    assert reasons[str(missing)] == "file not found"
    assert reasons[str(corrupt)].startswith("unreadable video: ")
    assert reasons[str(truncated)].startswith("unreadable video: ")
    assert reasons[str(short)] == "too short: 8 frames, needs 13"
    for path, reason in ds.skipped:
        assert any(path in r.message and reason in r.message for r in caplog.records)
    assert "skipped 4 of 5 videos" in caplog.text
    assert ds[0]["video"].shape == (3, 4, 32, 32)

    bad_only = write_manifest(tmp_path / "bad.jsonl", entries[1:])
    with pytest.raises(ValueError) as err:
        ClipDataset(bad_only, num_frames=4, frame_stride=4)
    message = str(err.value)
    assert str(bad_only) in message
    for path in (missing, corrupt, truncated, short):
        assert str(path) in message
    assert "file not found" in message and "too short" in message and "unreadable video" in message


def test_read_errors_at_getitem_name_the_file(tmp_path):
    video = shutil.copy(CLIPS / "carphone_distorted.mp4", tmp_path / "clip.mp4")
    ds = ClipDataset(one_video_manifest(tmp_path, Path(video)), num_frames=4, samples_per_epoch=2)
    Path(video).write_bytes(b"not a video any more")  # the reader is opened lazily, at first read
    with pytest.raises(RuntimeError, match="clip.mp4"):
        ds[0]


def test_bundled_manifest_is_idempotent(tmp_path):
    manifest = write_bundled_manifest(tmp_path)
    entries = read_manifest(manifest)
    assert {e.path.name for e in entries} == {
        "bigbuckbunny.mp4", "bikes.mp4", "carphone_distorted.mp4", "carphone_pristine.mp4"
    }
    assert all(e.path.is_file() and e.caption for e in entries)
    mtime = manifest.stat().st_mtime_ns
    os.utime(manifest, ns=(mtime - 10**9, mtime - 10**9))
    assert write_bundled_manifest(tmp_path) == manifest
    assert manifest.stat().st_mtime_ns == mtime - 10**9  # untouched
    manifest.write_text('{"path": "x.mp4", "caption": "stale"}\n')
    write_bundled_manifest(tmp_path)
    assert read_manifest(manifest) == entries


def test_resize_in_chunks_equals_one_pass(monkeypatch):
    from distill_pl.data import clips

    frames = torch.randint(0, 256, (5, 40, 60, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    whole = resize_center_crop(frames, 16, 16)
    monkeypatch.setattr(clips, "RESIZE_CHUNK_BYTES", 40 * 60 * 3 * 4 * 2)  # 2 frames per chunk
    assert torch.equal(resize_center_crop(frames, 16, 16), whole)
