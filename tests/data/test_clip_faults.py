"""Clips under faults and at scale: probing the last frame, read-time replacement, the
bad-read limit, epoch sampling over all videos, bounded open files."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import av
import pytest
import torch

from distill_pl.data.bundled import BUNDLED_CLIPS
from distill_pl.data.clips import ClipDataset, TooManyBadVideosError
from distill_pl.data.manifest import ManifestEntry, write_manifest
from distill_pl.util.paths import resolve_path

CLIPS = resolve_path(BUNDLED_CLIPS)
SMALL = dict(num_frames=4, frame_stride=4, height=16, width=16, cache_frames=False)


def faststart_remux(source: Path, dest: Path) -> Path:
    """``source`` remuxed (no re-encoding) with its index first (``movflags=faststart``)."""
    with av.open(str(source)) as inp, av.open(str(dest), "w", options={"movflags": "faststart"}) as out:
        stream = out.add_stream_from_template(inp.streams.video[0])
        for packet in inp.demux(inp.streams.video[0]):
            if packet.dts is not None:
                packet.stream = stream
                out.mux(packet)
    return dest


@pytest.fixture(scope="module")
def truncated(tmp_path_factory) -> Path:
    """bikes.mp4 remuxed index first and cut to 97% of its bytes: it opens, reports all 243
    frames and decodes the first ones, but not the last."""
    folder = tmp_path_factory.mktemp("truncated")
    full = faststart_remux(CLIPS / "bikes.mp4", folder / "bikes_faststart.mp4")
    data = full.read_bytes()
    cut = folder / "bikes_97.mp4"
    cut.write_bytes(data[: int(len(data) * 0.97)])
    return cut


@pytest.fixture(scope="module")
def zeroed_tail(tmp_path_factory) -> Path:
    """bikes.mp4 remuxed index first with its bytes from 70% on zeroed (a download that
    stopped in a preallocated file): it opens and reports all 250 frames, but frames from
    about 165 on do not decode, so with ``val_fraction=0.25`` its train part (frames 0..187)
    is unusable too."""
    folder = tmp_path_factory.mktemp("zeroed")
    full = faststart_remux(CLIPS / "bikes.mp4", folder / "bikes_faststart.mp4")
    data = full.read_bytes()
    keep = int(len(data) * 0.70)
    damaged = folder / "bikes_zeroed70.mp4"
    damaged.write_bytes(data[:keep] + bytes(len(data) - keep))
    return damaged


def manifest_of(tmp_path: Path, paths: list[Path]) -> Path:
    return write_manifest(tmp_path / "manifest.jsonl", [ManifestEntry(p, p.stem) for p in paths])


def test_probing_decodes_the_last_needed_frame(tmp_path, truncated):
    manifest = manifest_of(tmp_path, [CLIPS / "carphone_pristine.mp4", truncated])
    val = ClipDataset(manifest, split="val", val_fraction=0.25, **SMALL)
    assert [v.path for v in val.videos] == [CLIPS / "carphone_pristine.mp4"]
    [(path, reason)] = val.skipped
    assert path == str(truncated) and reason.startswith("unreadable video: frame 242 of 243")
    train = ClipDataset(manifest, split="train", val_fraction=0.25, **SMALL)  # its train part decodes
    assert len(train.videos) == 2 and not train.skipped


def test_a_zeroed_tail_breaks_the_train_part(tmp_path, zeroed_tail):
    """The file the kill-and-resume test relies on: all 250 frames counted, but the last
    frame of its train part (``val_fraction`` 0.25) does not decode."""
    from distill_pl.data.clips import count_frames

    assert count_frames(zeroed_tail) == (250, "")
    with pytest.raises(ValueError, match="unreadable video: frame 187 of 250"):
        ClipDataset(manifest_of(tmp_path, [zeroed_tail]), split="train", val_fraction=0.25, **SMALL)


def read_all(ds: ClipDataset, n: int) -> list[dict]:
    return [ds[i] for i in range(n)]


def test_read_faults_are_replaced_deterministically_and_reported_once(tmp_path, truncated, caplog):
    """Lazily probed, the truncated file fails when an item first needs it: those items are
    replaced by windows of other videos, the same ones in a fresh process-state (a resume),
    and the file is reported once."""
    manifest = manifest_of(tmp_path, [CLIPS / "carphone_pristine.mp4", CLIPS / "bigbuckbunny.mp4", truncated])
    settings = dict(val_fraction=0.005, samples_per_epoch=6, probe="lazy", max_bad_read_fraction=0.5, **SMALL)
    with caplog.at_level(logging.WARNING, logger="distill_pl.data"):
        ds = ClipDataset(manifest, **settings)
        items = read_all(ds, 6)
    assert {item["path"] for item in items} == {str(CLIPS / "carphone_pristine.mp4"), str(CLIPS / "bigbuckbunny.mp4")}
    assert list(ds.read_failures) == [str(truncated)] and ds.replaced_reads == 2 and ds.reads == 6
    assert sum(str(truncated) in r.message for r in caplog.records) == 1
    again = ClipDataset(manifest, **settings)  # a resumed run: new process state, items 3.. first
    for i in [3, 4, 5, 0, 1, 2]:
        item = again[i]
        assert (item["path"], item["start"]) == (items[i]["path"], items[i]["start"])
        assert torch.equal(item["video"], items[i]["video"])


def test_a_file_that_breaks_after_probing_is_replaced_at_read_time(tmp_path):
    good = faststart_remux(CLIPS / "bikes.mp4", tmp_path / "bikes.mp4")
    manifest = manifest_of(tmp_path, [CLIPS / "carphone_pristine.mp4", good])
    ds = ClipDataset(manifest, val_fraction=0.01, samples_per_epoch=16, max_bad_read_fraction=0.5, **SMALL)
    data = good.read_bytes()
    good.write_bytes(data[: int(len(data) * 0.85)])  # the file is cut short on disk during the run
    items = read_all(ds, 16)
    assert str(good) in ds.read_failures and "cannot read frames" in ds.read_failures[str(good)]
    assert 0 < ds.replaced_reads < 8  # only the windows that reach the cut-off part
    assert any(item["path"] == str(good) for item in items)  # its early windows still read


def test_too_many_bad_reads_stop_with_a_clear_error(tmp_path, truncated):
    manifest = manifest_of(tmp_path, [CLIPS / "carphone_pristine.mp4", truncated])
    ds = ClipDataset(manifest, val_fraction=0.005, samples_per_epoch=64, probe="lazy",
                     max_bad_read_fraction=0.1, **SMALL)
    with pytest.raises(TooManyBadVideosError, match=f"needed a replacement, more than max_bad_read_fraction=0.1; "
                                                    f"failing files: {truncated}"):
        read_all(ds, 64)


@pytest.fixture
def eleven_videos(tmp_path) -> Path:
    links = []
    for k in range(11):
        link = tmp_path / f"video{k:02d}.mp4"
        link.symlink_to(CLIPS / "carphone_pristine.mp4")
        links.append(link)
    return manifest_of(tmp_path, links)


def test_epochs_walk_through_all_videos(eleven_videos):
    ds = ClipDataset(eleven_videos, samples_per_epoch=4, probe="lazy", **SMALL)
    seen = set()
    for epoch in range(3):
        ds.set_epoch(epoch)
        seen |= {ds.window(i)[0].path.name for i in range(4)}
    assert len(seen) == 11


def open_files() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_open_video_files_stay_bounded(eleven_videos):
    before = open_files()
    ds = ClipDataset(eleven_videos, samples_per_epoch=22, max_open_videos=2, **SMALL)
    assert open_files() - before <= 1  # probing closes what it opens
    read_all(ds, 22)  # all 11 videos, twice
    assert len(ds._readers) == 2 and open_files() - before <= 2 * 2


@pytest.mark.slow  # three runs of the teacher config (about 3 min on a loaded 2-core machine)
def test_kill_and_resume_over_a_truncated_video_stays_exact(tmp_path, zeroed_tail):
    """The teacher config (``val_fraction`` 0.25) on the bundled clips plus a remux whose tail
    is zeroed (probed lazily, so its items fail at read time and are replaced): training
    continues, and a run killed after a checkpoint and resumed logs the uninterrupted run's
    losses. (Not the 97% cut ``truncated``: only its last 3 frames fail, in the train part
    only for ``val_fraction`` < 0.0103, which leaves no bundled video a val window, and the
    up-front video-length check refuses such a manifest.)"""
    import signal
    import time

    import yaml

    from distill_pl.data.bundled import write_bundled_manifest
    from distill_pl.data.manifest import read_manifest
    from tests.cli_helpers import run_cli, scalar_events, start_cli
    from tests.training.test_teacher_cli import fast_teacher_config, last_saved_step

    entries = [*read_manifest(write_bundled_manifest(tmp_path / "bundled")), ManifestEntry(zeroed_tail, "bikes")]
    manifest = write_manifest(tmp_path / "manifest.jsonl", entries)

    def config(folder: Path, max_steps: int) -> Path:
        path = fast_teacher_config(folder / "c.yaml", max_steps)
        cfg = yaml.safe_load(path.read_text())
        cfg["trainer"]["limit_val_batches"] = 0
        cfg["data"].update(manifest=str(manifest), probe="lazy", max_bad_read_fraction=0.5)
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        return path

    full_dir, killed_dir = tmp_path / "full", tmp_path / "killed"
    full_dir.mkdir(), killed_dir.mkdir()
    proc = run_cli(["fit", "--config", str(config(full_dir, 8))], cwd=full_dir)
    assert f"video {zeroed_tail} failed at read time" in proc.stderr.replace("\n", " ")
    proc = start_cli(["fit", "--config", str(config(killed_dir, 10_000))], cwd=killed_dir)
    ckpt = killed_dir / "runs/tiny/teacher/checkpoints/last.ckpt"
    deadline = time.time() + 300
    while last_saved_step(ckpt) < 4:
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert time.time() < deadline
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    saved = last_saved_step(ckpt)
    run_cli(["fit", "--config", str(config(killed_dir, 8)), "--ckpt_path", "last"], cwd=killed_dir)
    resumed = scalar_events(sorted((killed_dir / "runs/tiny/teacher").glob("version_*"))[-1], "train/loss")
    full = scalar_events(full_dir / "runs/tiny/teacher", "train/loss")
    assert sorted(resumed) == list(range(saved, 8))
    for step, value in resumed.items():
        assert value == pytest.approx(full[step], rel=1e-5, abs=1e-6), step


@pytest.mark.parametrize("probe", ["eager", "lazy"])
def test_videos_the_start_up_check_skipped_are_not_used_nor_reported_again(tmp_path, caplog, monkeypatch, probe):
    """check_video_lengths opens each file once and reports the unusable ones once; the clip
    data sets of the same settings leave them out (lazy probing too) without opening them."""
    from distill_pl.data import clips
    from distill_pl.data.datamodule import VideoDataModule

    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"not a video")
    manifest = manifest_of(tmp_path, [CLIPS / "carphone_pristine.mp4", broken])
    data = VideoDataModule(cache_dir=str(tmp_path / "cache"), manifest=str(manifest), probe=probe,
                           num_frames=4, frame_stride=4, height=16, width=16, samples_per_epoch=4)
    opened = []
    real = clips.open_video
    monkeypatch.setattr(clips, "open_video", lambda path: opened.append(Path(path)) or real(path))
    with caplog.at_level(logging.WARNING, logger="distill_pl.data"):
        data.check_video_lengths()
        assert opened.count(broken) == 1
        train = data.clip_dataset("train")
    assert opened.count(broken) == 1  # not opened again
    assert [str(v.path) for v in train.videos] == [str(CLIPS / "carphone_pristine.mp4")]
    assert [path for path, _ in train.skipped] == [str(broken)]
    assert sum(str(broken.name) in r.getMessage() for r in caplog.records) == 1, [r.getMessage() for r in caplog.records]
    assert train[0]["path"] == str(CLIPS / "carphone_pristine.mp4") and train.read_failures == {}


def test_the_start_up_check_applies_however_the_manifest_is_named(tmp_path, monkeypatch):
    """The CLI's check and the trainer's data module may name the manifest differently
    (absolute / relative to the working folder): every process must leave out the same videos,
    or data-parallel ranks would read different data sets than one process."""
    from distill_pl.data.datamodule import VideoDataModule

    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"not a video")
    manifest = manifest_of(tmp_path, [CLIPS / "carphone_pristine.mp4", broken])
    settings = dict(num_frames=4, frame_stride=4, height=16, width=16, samples_per_epoch=4, probe="lazy")
    VideoDataModule(cache_dir=str(tmp_path / "cache"), manifest=str(manifest), **settings).check_video_lengths()
    monkeypatch.chdir(tmp_path)
    relative = VideoDataModule(cache_dir="cache", manifest=manifest.name, **settings)
    assert [path for path, _ in relative.clip_dataset("train").skipped] == [str(broken)]
