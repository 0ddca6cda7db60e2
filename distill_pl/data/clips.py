"""Short clips cut from the videos of a manifest, with their canny control.

Temporal split: in every video of F frames the last ``round(F * val_fraction)`` frames are
held out for validation. A window is ``num_frames`` frames ``frame_stride`` apart, spanning
``(num_frames - 1) * frame_stride + 1`` frames; train windows lie inside the first part,
val windows inside the held-out part, so train and val never share a frame.

- train: ``samples_per_epoch`` items; item ``i`` comes from video ``i % num_videos`` with a
  start drawn from ``np.random.default_rng([seed, epoch, i])``: deterministic given
  (seed, epoch, i). Call ``set_epoch`` for new windows.
- val: ``val_clips_per_video`` windows per video, starts evenly spaced over the held-out part.

Frames are decoded with decord, resized (bilinear, antialiased) so the shorter side covers
(height, width), center cropped and mapped to [-1, 1].

With ``cache_frames`` (default) each video is decoded once per process, resized and kept in
memory with its control, and clips are sliced from that cache: the bundled clips take a few
MB at 32x32, and training is no longer bound by decoding 720p frames. Turn it off for data
sets that do not fit in memory.

Unusable videos (missing, unreadable, too short for a window of the split) are skipped at
construction, each logged on ``distill_pl.data`` with its reason, and listed in ``skipped``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import decord
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from distill_pl.data.control import canny_control
from distill_pl.data.manifest import read_manifest

log = logging.getLogger("distill_pl.data")


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def open_video(path: str | Path) -> decord.VideoReader:
    """A single-threaded CPU decord reader (decord's own exceptions pass through)."""
    return decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=1)


def count_frames(path: Path) -> tuple[int | None, str]:
    """The number of frames of the video at ``path``, or None and the reason it is unusable."""
    if not path.is_file():
        return None, "file not found"
    try:
        reader = open_video(path)
        total = len(reader)
        reader[0]  # opening reads only the header: decode one frame too
        del reader
    except Exception as err:  # decord raises its own error types
        return None, f"unreadable video: {_first_line(err)}"
    return total, ""


def minimum_video_frames(num_frames: int, frame_stride: int, val_fraction: float) -> int:
    """The fewest frames a video needs for one window in its train part and one in its
    held-out part: a window spans ``(num_frames - 1) * frame_stride + 1`` frames, the
    held-out part is the last ``round(F * val_fraction)`` of F frames (8, 4, 0.25: 115)."""
    span = (num_frames - 1) * frame_stride + 1
    total = span
    while min(round(total * val_fraction), total - round(total * val_fraction)) < span:
        total += 1
    return total


def resize_center_crop(frames: Tensor, height: int, width: int) -> Tensor:
    """uint8 frames [T, H0, W0, 3] -> float32 [3, T, height, width] in [-1, 1].

    The shorter side (relative to the target aspect) is scaled to cover the target with
    bilinear antialiased interpolation, then the center is cropped. A frame already of the
    target size is left untouched.
    """
    x = frames.permute(0, 3, 1, 2).float()  # [T, 3, H0, W0]
    h0, w0 = x.shape[-2:]
    if (h0, w0) != (height, width):
        scale = max(height / h0, width / w0)
        size = (max(height, round(h0 * scale)), max(width, round(w0 * scale)))
        x = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
        top, left = (x.shape[-2] - height) // 2, (x.shape[-1] - width) // 2
        x = x[..., top : top + height, left : left + width]
    return (x / 127.5 - 1).clamp(-1, 1).transpose(0, 1).contiguous()


@dataclass(frozen=True)
class VideoPart:
    """The part of a video a split draws windows from: starts in [first, last_start]."""

    path: Path
    caption: str
    first: int
    last_start: int


class ClipDataset(Dataset):
    """Clips [3, T, H, W] in [-1, 1] with canny control, cut from the videos of ``manifest``.

    Items are dicts: ``video`` [3, T, H, W] float32, ``control`` [3, T, H, W] (see
    :func:`canny_control`), ``caption`` str, ``path`` str (the video's absolute path from the
    manifest), ``start`` int (first frame index). Frame indices are
    ``start + frame_stride * arange(num_frames)``.
    """

    def __init__(
        self,
        manifest: str | Path,
        num_frames: int = 8,
        frame_stride: int = 4,
        height: int = 32,
        width: int = 32,
        split: Literal["train", "val"] = "train",
        val_fraction: float = 0.2,
        samples_per_epoch: int = 256,
        val_clips_per_video: int = 2,
        seed: int = 0,
        canny_low: float = 0.2,
        canny_high: float = 0.4,
        cache_frames: bool = True,
    ):
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', not {split!r}")
        if not 0 < val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1), not {val_fraction}")
        if num_frames < 1 or frame_stride < 1:
            raise ValueError("num_frames and frame_stride must be >= 1")
        self.manifest = Path(manifest)
        self.num_frames = num_frames
        self.frame_stride = frame_stride
        self.height = height
        self.width = width
        self.split = split
        self.val_fraction = val_fraction
        self.samples_per_epoch = samples_per_epoch
        self.val_clips_per_video = val_clips_per_video
        self.seed = seed
        self.canny_low = canny_low
        self.canny_high = canny_high
        self.cache_frames = cache_frames
        self.epoch = 0
        self.span = (num_frames - 1) * frame_stride + 1
        self.skipped: list[tuple[str, str]] = []
        self.videos: list[VideoPart] = []
        for entry in read_manifest(manifest):
            video, reason = self._probe(entry.path, entry.caption)
            if video is not None:
                self.videos.append(video)
            else:
                self.skipped.append((str(entry.path), reason))
                log.warning("skipping video %s: %s", entry.path, reason)
        if not self.videos:
            reasons = "; ".join(f"{path}: {reason}" for path, reason in self.skipped)
            raise ValueError(f"manifest {self.manifest}: no usable video for split '{split}' ({reasons})")
        if self.skipped:
            log.warning(
                "%s (%s split): skipped %d of %d videos",
                self.manifest, split, len(self.skipped), len(self.skipped) + len(self.videos),
            )
        self._readers: dict[Path, decord.VideoReader] = {}
        self._cache: dict[Path, tuple[Tensor, Tensor]] = {}
        self._readers_pid = os.getpid()

    def _probe(self, path: Path, caption: str) -> tuple[VideoPart | None, str]:
        """The video's usable part for this split, or None and the reason it is unusable."""
        total, reason = count_frames(path)
        if total is None:
            return None, reason
        boundary = total - round(total * self.val_fraction)
        first, end = (0, boundary) if self.split == "train" else (boundary, total)
        if end - first < self.span:
            return None, f"too short: {end - first} frames, needs {self.span}"
        return VideoPart(path, caption, first, end - self.span), ""

    def set_epoch(self, epoch: int) -> None:
        """Select the train windows of ``epoch`` (no effect on val)."""
        self.epoch = epoch

    def __len__(self) -> int:
        if self.split == "train":
            return self.samples_per_epoch
        return len(self.videos) * self.val_clips_per_video

    def window(self, index: int) -> tuple[VideoPart, int]:
        """The video and window start of item ``index``."""
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items")
        if self.split == "train":
            video = self.videos[index % len(self.videos)]
            rng = np.random.default_rng([self.seed, self.epoch, index])
            return video, video.first + int(rng.integers(0, video.last_start - video.first + 1))
        video = self.videos[index // self.val_clips_per_video]
        starts = np.linspace(video.first, video.last_start, self.val_clips_per_video)
        return video, int(round(starts[index % self.val_clips_per_video]))

    def _reader(self, path: Path) -> decord.VideoReader:
        """This process's reader of ``path`` (readers are never shared across processes)."""
        if self._readers_pid != os.getpid():
            self._readers, self._cache, self._readers_pid = {}, {}, os.getpid()
        if path not in self._readers:
            self._readers[path] = open_video(path)
        return self._readers[path]

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_readers"] = {}
        state["_cache"] = {}
        return state

    def _read(self, path: Path, indices: list[int]) -> Tensor:
        """Frames ``indices`` of ``path`` as uint8 [T, H0, W0, 3]."""
        try:
            return torch.from_numpy(self._reader(path).get_batch(indices).asnumpy())
        except Exception as err:
            raise RuntimeError(f"cannot read frames {indices} of {path}: {_first_line(err)}") from None

    def _cached(self, video: VideoPart) -> tuple[Tensor, Tensor]:
        """(clip frames [3, F, H, W], control [3, F, H, W]) of the whole split part, decoded once."""
        if video.path not in self._cache:
            end = video.last_start + self.span
            chunks = [
                resize_center_crop(self._read(video.path, list(range(i, min(i + 32, end)))), self.height, self.width)
                for i in range(video.first, end, 32)
            ]
            frames = torch.cat(chunks, dim=1)
            self._cache[video.path] = (frames, canny_control(frames, self.canny_low, self.canny_high))
            self._readers.pop(video.path, None)
        return self._cache[video.path]

    def __getitem__(self, index: int) -> dict:
        video, start = self.window(index)
        indices = list(range(start, start + self.span, self.frame_stride))
        if self.cache_frames:
            frames, control = self._cached(video)
            local = [i - video.first for i in indices]
            clip, clip_control = frames[:, local], control[:, local]
        else:
            clip = resize_center_crop(self._read(video.path, indices), self.height, self.width)
            clip_control = canny_control(clip, self.canny_low, self.canny_high)
        return {
            "video": clip,
            "control": clip_control,
            "caption": video.caption,
            "path": str(video.path),
            "start": start,
        }
