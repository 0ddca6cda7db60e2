"""Short clips cut from the videos of a manifest, with their control (canny edges by default).

Temporal split: in every video of F frames the last ``round(F * val_fraction)`` frames are
held out for validation. A window is ``num_frames`` frames ``frame_stride`` apart, spanning
``(num_frames - 1) * frame_stride + 1`` frames; train windows lie inside the first part,
val windows inside the held-out part, so train and val never share a frame.

- train: ``samples_per_epoch`` items per epoch. Items walk through seeded permutations of
  all N videos: item ``i`` of epoch ``e`` is at position ``p = e * samples_per_epoch + i`` and
  takes video ``perm_c[p % N]`` of the permutation ``c = p // N`` (seeded by (seed, c)), so
  every video is used once per N consecutive items whatever ``samples_per_epoch`` is; its
  window start is drawn from ``np.random.default_rng([seed, epoch, i])``. Deterministic given
  (seed, epoch, i). Call ``set_epoch`` for the next items.
- val: ``val_clips_per_video`` windows per video, starts evenly spaced over the held-out part.

Frames are decoded with decord, resized (bilinear, antialiased) so the shorter side covers
(height, width), center cropped and mapped to [-1, 1]. Frames are converted to float and
resized in chunks of at most ``RESIZE_CHUNK_BYTES`` of float32 source pixels, and the control
(:class:`~distill_pl.data.controls.ControlSettings`: canny edges, a blur, or a control video of
the manifest read with the clip's window) is made over chunks of frames too, so memory stays
bounded at any source resolution (per-frame operations: the result does not depend on the
chunking).

With ``cache_frames`` each video is decoded once per process, resized and kept in memory with
its control, and clips are sliced from that cache: the bundled clips take a few MB at 32x32,
and training is no longer bound by decoding 720p frames. Keep it off (one window decoded per
item) for data sets that do not fit in memory. Open readers are bounded: at most
``max_open_videos`` per process (least recently used closed first).

Probing (``probe="eager"``, the default): at construction every video is opened in a thread
pool (with a progress bar for large manifests) and its last frame this split can need is
decoded, not only its header; with ``control: video`` its control video is checked against it
(:func:`~distill_pl.data.control_videos.check_control_video`: a mismatch is an error naming
both files); with ``control: clip`` the conditioning image the manifest names (``image``, see
:mod:`~distill_pl.data.condition_images`), if any, is decoded (missing or unreadable: an error
naming the manifest, the clip and the key); unusable videos (missing, unreadable, too short for a window of the split) are skipped, each logged on ``distill_pl.data`` with its reason, and listed in
``skipped``. ``probe="lazy"``: nothing is opened at construction; a video is probed when an
item first needs it, and an unusable one is then a read fault (below). ``known_unusable``
({path: reason}, e.g. the files the start-up check
:meth:`~distill_pl.data.datamodule.VideoDataModule.check_video_lengths` reported): left out
in both modes without being opened or reported again, and listed in ``skipped``.

Read faults: an item whose video cannot be read (or, lazily probed, is unusable) is replaced
by the window of another video drawn from ``np.random.default_rng([seed, epoch, i, k])``
(attempt ``k = 1, 2, ...``). The replacement depends only on the item and on which reads fail,
so a resumed run reads the same items. Each failing file is logged once per process and
listed in ``read_failures``; when more than ``max_bad_read_fraction`` of the items read (at
least 20 counted) needed a replacement the read raises :class:`TooManyBadVideosError`.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Mapping

import decord
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from distill_pl.data.condition_images import check_condition_image, decode_image, with_first_frame
from distill_pl.data.control_videos import check_control_video, control_video_path, video_format
from distill_pl.data.controls import ControlName, ControlSettings
from distill_pl.data.manifest import ManifestEntry, read_manifest

log = logging.getLogger("distill_pl.data")

#: float32 source pixels converted and resized at a time (a 1080p frame is about 25 MB)
RESIZE_CHUNK_BYTES = 256 * 2**20
#: replacement attempts for an item before the read gives up
MAX_REPLACEMENTS = 16
#: reads counted at least when judging ``max_bad_read_fraction`` (so one early bad read does not stop a run)
MIN_COUNTED_READS = 20
#: manifests at least this long show a progress bar while probing
PROGRESS_MIN_VIDEOS = 64
_VIDEO_ORDER_SALT = 0x5EED  # the video permutations' seeds differ from the sampler's


class VideoReadError(RuntimeError):
    """Frames of a video could not be decoded (message: the file, the frames, decord's error)."""


class TooManyBadVideosError(RuntimeError):
    """More than ``max_bad_read_fraction`` of the items read needed a replacement."""


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
    target size is left untouched. Frames are converted to float32 and resized in chunks of
    at most :data:`RESIZE_CHUNK_BYTES` (at least one frame), so the float copy of a long
    high-resolution batch never exists at once.
    """
    t, h0, w0, _ = frames.shape
    per_chunk = max(1, RESIZE_CHUNK_BYTES // (h0 * w0 * 3 * 4))
    out = torch.empty(3, t, height, width)
    for lo in range(0, t, per_chunk):
        x = frames[lo : lo + per_chunk].permute(0, 3, 1, 2).float()  # [t, 3, H0, W0]
        if (h0, w0) != (height, width):
            scale = max(height / h0, width / w0)
            size = (max(height, round(h0 * scale)), max(width, round(w0 * scale)))
            x = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
            top, left = (x.shape[-2] - height) // 2, (x.shape[-1] - width) // 2
            x = x[..., top : top + height, left : left + width]
        out[:, lo : lo + per_chunk] = (x / 127.5 - 1).clamp(-1, 1).transpose(0, 1)
    return out


@dataclass(frozen=True)
class VideoPart:
    """The part of a video a split draws windows from: starts in [first, last_start];
    ``control``: its control video (``control: video``), else None; ``image``: the
    conditioning image the manifest names (``control: clip``), else None (the first frame)."""

    path: Path
    caption: str
    first: int
    last_start: int
    control: Path | None = None
    image: Path | None = None


class ClipDataset(Dataset):
    """Clips [3, T, H, W] in [-1, 1] with their control, cut from the videos of ``manifest``.

    Items are dicts: ``video`` [3, T, H, W] float32, ``control`` [3, T, H, W] in [-1, 1] (the
    ``control`` setting, see :mod:`distill_pl.data.controls`), ``caption`` str, ``path`` str (the video's absolute path from the
    manifest), ``start`` int (first frame index), with ``control: video`` ``control_path``
    str (the control video's absolute path), and with ``control: clip`` ``image_path`` str (the
    manifest's conditioning image, absolute, which is then the control's first frame; "" when
    the line names none and the control's first frame is the clip's). Frame indices are
    ``start + frame_stride * arange(num_frames)``. ``videos`` lists the candidate videos
    (:class:`VideoPart` when probed eagerly, :class:`ManifestEntry` when lazily); see the
    module docstring for sampling, probing and read faults.
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
        control: ControlName = "edge",
        control_key: str | None = None,
        cache_frames: bool = True,
        probe: Literal["eager", "lazy"] = "eager",
        probe_workers: int = 8,
        max_open_videos: int = 8,
        max_bad_read_fraction: float = 0.1,
        known_unusable: Mapping[str, str] | None = None,
    ):
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', not {split!r}")
        if not 0 < val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1), not {val_fraction}")
        if num_frames < 1 or frame_stride < 1:
            raise ValueError("num_frames and frame_stride must be >= 1")
        if probe not in ("eager", "lazy"):
            raise ValueError(f"probe must be 'eager' or 'lazy', not {probe!r}")
        if max_open_videos < 1:
            raise ValueError(f"max_open_videos must be >= 1, not {max_open_videos}")
        if not 0 <= max_bad_read_fraction <= 1:
            raise ValueError(f"max_bad_read_fraction must be in [0, 1], not {max_bad_read_fraction}")
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
        self.controls = ControlSettings(control, canny_low, canny_high, control_key)
        self.cache_frames = cache_frames
        self.max_open_videos = max_open_videos
        self.max_bad_read_fraction = max_bad_read_fraction
        self.epoch = 0
        self.span = (num_frames - 1) * frame_stride + 1
        self.skipped: list[tuple[str, str]] = []
        entries = read_manifest(manifest)
        known = dict(known_unusable or {})
        self.skipped = [(str(e.path), known[str(e.path)]) for e in entries if str(e.path) in known]
        entries = [e for e in entries if str(e.path) not in known]  # reported already: not opened again
        self.videos: list[VideoPart | ManifestEntry] = []
        if probe == "lazy":
            self.videos = list(entries)
        else:
            for entry, (video, reason) in zip(entries, self._probe_all(entries, probe_workers)):
                if video is not None:
                    self.videos.append(video)
                else:
                    self.skipped.append((str(entry.path), reason))
                    log.warning("skipping video %s: %s", entry.path, reason)
        if not self.videos:
            reasons = "; ".join(f"{path}: {reason}" for path, reason in self.skipped)
            raise ValueError(f"manifest {self.manifest}: no usable video for split '{split}' ({reasons})")
        if len(self.skipped) > len(known):  # only news: the known ones were reported where found
            log.warning(
                "%s (%s split): skipped %d of %d videos",
                self.manifest, split, len(self.skipped), len(self.skipped) + len(self.videos),
            )
        self._reset_process_state()

    def _reset_process_state(self) -> None:
        """Readers, caches and read-fault counts: per process, never shared with workers."""
        self._readers: OrderedDict[Path, decord.VideoReader] = OrderedDict()
        self._cache: dict[Path, tuple[Tensor, Tensor] | str] = {}
        self._images: dict[Path, Tensor] = {}
        self._parts: dict[int, VideoPart | None] = {}
        self._order: tuple[int, np.ndarray] | None = None
        self.read_failures: dict[str, str] = {}
        self.reads = 0
        self.replaced_reads = 0
        self._pid = os.getpid()

    # --- probing ---------------------------------------------------------------------------
    def _probe_all(self, entries: list[ManifestEntry], workers: int) -> list[tuple[VideoPart | None, str]]:
        """:meth:`_probe` of every entry, in a thread pool, with a progress bar for long manifests."""
        if len(entries) < 2 or workers <= 1:
            return [self._probe(e) for e in entries]
        with ThreadPoolExecutor(max_workers=workers) as pool:
            results = pool.map(self._probe, entries)
            if len(entries) >= PROGRESS_MIN_VIDEOS:
                from tqdm import tqdm

                results = tqdm(results, total=len(entries), desc=f"probing videos ({self.split})", unit="video")
            return list(results)

    def _probe(self, entry: ManifestEntry) -> tuple[VideoPart | None, str]:
        """The video's usable part for this split, or None and the reason it is unusable.
        Decodes the last frame the split can need (a truncated file often still opens and
        decodes its first frames). A control video that does not match it raises ValueError
        naming both files."""
        path = entry.path
        control = None if self.controls.computed else control_video_path(entry, self.controls.control_key, self.manifest)
        if not path.is_file():
            return None, "file not found"
        try:
            reader = open_video(path)
            total = len(reader)
            clip_format = video_format(reader) if control is not None else None
        except Exception as err:  # decord raises its own error types
            return None, f"unreadable video: {_first_line(err)}"
        if control is not None:
            check_control_video(path, clip_format, control, open_video)
        image = entry.image if self.controls.control == "clip" else None
        if image is not None:
            check_condition_image(image, path, self.manifest)
        boundary = total - round(total * self.val_fraction)
        first, end = (0, boundary) if self.split == "train" else (boundary, total)
        if end - first < self.span:
            return None, f"too short: {end - first} frames, needs {self.span}"
        try:
            reader.get_batch([end - 1])
        except Exception as err:
            return None, f"unreadable video: frame {end - 1} of {total}: {_first_line(err)}"
        finally:
            del reader
        return VideoPart(path, entry.caption, first, end - self.span, control, image), ""

    def part(self, i: int) -> VideoPart | None:
        """The usable part of video ``i`` (probed on first use when probing is lazy; None if
        it is unusable, which is then reported as a read fault)."""
        video = self.videos[i]
        if isinstance(video, VideoPart):
            return video
        self._check_process()
        if i not in self._parts:
            part, reason = self._probe(video)
            self._parts[i] = part
            if part is None:
                self._report(video.path, reason)
        return self._parts[i]

    # --- which window ----------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Select the train windows of ``epoch`` (no effect on val)."""
        self.epoch = epoch

    def __len__(self) -> int:
        if self.split == "train":
            return self.samples_per_epoch
        return len(self.videos) * self.val_clips_per_video

    def _video_order(self, cycle: int) -> np.ndarray:
        """The permutation of all videos that train positions ``cycle * N ..`` walk through."""
        if self._order is None or self._order[0] != cycle:
            self._order = (cycle, np.random.default_rng([self.seed, _VIDEO_ORDER_SALT, cycle]).permutation(len(self.videos)))
        return self._order[1]

    def window(self, index: int, attempt: int = 0) -> tuple[VideoPart | None, int]:
        """The video part and window start of item ``index``; ``attempt`` k > 0: its k-th
        replacement (see the module docstring). The part is None (and the start the video's
        index) when a lazily probed video turns out unusable."""
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items")
        n = len(self.videos)
        if self.split == "train":
            if attempt == 0:
                cycle, offset = divmod(self.epoch * self.samples_per_epoch + index, n)
                i = int(self._video_order(cycle)[offset])
                rng = np.random.default_rng([self.seed, self.epoch, index])
            else:
                rng = np.random.default_rng([self.seed, self.epoch, index, attempt])
                i = int(rng.integers(n))
            video = self.part(i)
            if video is None:
                return None, i
            return video, video.first + int(rng.integers(0, video.last_start - video.first + 1))
        if attempt == 0:
            i, k = divmod(index, self.val_clips_per_video)
        else:
            rng = np.random.default_rng([self.seed, index, attempt])
            i, k = int(rng.integers(n)), int(rng.integers(self.val_clips_per_video))
        video = self.part(i)
        if video is None:
            return None, i
        starts = np.linspace(video.first, video.last_start, self.val_clips_per_video)
        return video, int(round(starts[k]))

    # --- reading ---------------------------------------------------------------------------
    def _check_process(self) -> None:
        if self._pid != os.getpid():  # a DataLoader worker: nothing of the parent's
            self._reset_process_state()

    def _reader(self, path: Path) -> decord.VideoReader:
        """This process's reader of ``path``; at most ``max_open_videos`` stay open."""
        self._check_process()
        if path in self._readers:
            self._readers.move_to_end(path)
        else:
            self._readers[path] = open_video(path)
            while len(self._readers) > self.max_open_videos:
                self._readers.popitem(last=False)
        return self._readers[path]

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        for key in ("_readers", "_cache", "_parts", "_images"):
            state[key] = type(state[key])()
        return state

    def _read(self, path: Path, indices: list[int]) -> Tensor:
        """Frames ``indices`` of ``path`` as uint8 [T, H0, W0, 3]; VideoReadError if they
        cannot be decoded (the reader is closed then, so the next read starts afresh)."""
        try:
            return torch.from_numpy(self._reader(path).get_batch(indices).asnumpy())
        except Exception as err:
            self._readers.pop(path, None)
            raise VideoReadError(f"cannot read frames {indices[0]}..{indices[-1]} of {path}: {_first_line(err)}") from None

    def _frames(self, path: Path, indices: list[int]) -> Tensor:
        """Frames ``indices`` of ``path`` resized and cropped: [3, len(indices), H, W] in
        [-1, 1], decoded 32 at a time."""
        chunks = [resize_center_crop(self._read(path, indices[i : i + 32]), self.height, self.width)
                  for i in range(0, len(indices), 32)]
        return torch.cat(chunks, dim=1)

    def _with_control(self, video: VideoPart, indices: list[int]) -> tuple[Tensor, Tensor]:
        """(clip frames, control) [3, len(indices), H, W] of frames ``indices`` of ``video``:
        the control computed from the frames, or the same frames of its control video."""
        frames = self._frames(video.path, indices)
        if self.controls.computed:
            return frames, self.controls.compute(frames)
        return frames, self._frames(video.control, indices)

    def _cached(self, video: VideoPart) -> tuple[Tensor, Tensor]:
        """(clip frames [3, F, H, W], control [3, F, H, W]) of the whole split part, decoded
        once (a failure is remembered too)."""
        self._check_process()
        if video.path not in self._cache:
            try:
                self._cache[video.path] = self._with_control(video, list(range(video.first, video.last_start + self.span)))
            except VideoReadError as err:
                self._cache[video.path] = str(err)
            self._readers.pop(video.path, None)
            self._readers.pop(video.control, None)
        cached = self._cache[video.path]
        if isinstance(cached, str):
            raise VideoReadError(cached)
        return cached

    def _clip(self, video: VideoPart, start: int) -> tuple[Tensor, Tensor]:
        """(clip, control) [3, T, H, W] of the window at ``start``; the control's first frame
        is the manifest's conditioning image when it names one."""
        indices = list(range(start, start + self.span, self.frame_stride))
        if self.cache_frames:
            frames, control = self._cached(video)
            local = [i - video.first for i in indices]
            frames, control = frames[:, local], control[:, local]
        else:
            frames, control = self._with_control(video, indices)
        if video.image is not None:
            control = with_first_frame(control, self._image(video.image))
        return frames, control

    def _image(self, path: Path) -> Tensor:
        """The conditioning image at ``path`` resized and cropped like the frames: [3, 1, H, W]
        in [-1, 1], decoded once per process."""
        if path not in self._images:
            self._images[path] = resize_center_crop(decode_image(path), self.height, self.width)
        return self._images[path]

    def _report(self, path: Path, reason: str) -> None:
        """Log a failing file once per process."""
        if str(path) not in self.read_failures:
            self.read_failures[str(path)] = reason
            log.warning("video %s failed at read time (%s); its items are replaced by windows of other "
                        "videos (reported once)", path, reason)

    def _count(self, replaced: bool) -> None:
        self.reads += 1
        self.replaced_reads += int(replaced)
        limit = self.max_bad_read_fraction * max(self.reads, MIN_COUNTED_READS)
        if self.replaced_reads > limit:
            files = "; ".join(f"{p}: {r}" for p, r in self.read_failures.items())
            raise TooManyBadVideosError(
                f"manifest {self.manifest} ({self.split} split): {self.replaced_reads} of {self.reads} items "
                f"read in this process needed a replacement, more than max_bad_read_fraction="
                f"{self.max_bad_read_fraction}; failing files: {files}"
            )

    def __getitem__(self, index: int) -> dict:
        self._check_process()
        for attempt in range(MAX_REPLACEMENTS + 1):
            video, start = self.window(index, attempt)
            if video is None:
                continue
            try:
                clip, clip_control = self._clip(video, start)
            except VideoReadError as err:
                self._report(video.path, str(err))
                continue
            self._count(replaced=attempt > 0)
            return {
                "video": clip,
                "control": clip_control,
                "caption": video.caption,
                "path": str(video.path),
                "start": start,
                **({"control_path": str(video.control)} if video.control is not None else {}),
                **({"image_path": str(video.image or "")} if self.controls.control == "clip" else {}),
            }
        raise TooManyBadVideosError(
            f"manifest {self.manifest} ({self.split} split): item {index} and its {MAX_REPLACEMENTS} "
            f"replacements could not be read; failing files: {'; '.join(self.read_failures)}"
        )
