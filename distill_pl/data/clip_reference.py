"""Clips stored by reference: (video path, start frame, clip settings) instead of pixels.

A shard that references a clip keeps the video's sha256 (:func:`~distill_pl.util.hashing.file_sha256`). Reading
re-derives the clip exactly as :class:`~distill_pl.data.clips.ClipDataset` made it: frames
``start + frame_stride * arange(num_frames)`` decoded with decord, resized and center
cropped (:func:`~distill_pl.data.clips.resize_center_crop`), the control computed at that
size (:class:`~distill_pl.data.controls.ControlSettings`: canny edges or a blur), or, with
``control: video``, the same frames of the clip's control video, referenced by its own path
and sha256 beside the clip's. With ``control: clip`` a row may reference the conditioning
image its manifest line named (:mod:`~distill_pl.data.condition_images`), by path and
sha256 too: it replaces the control's first frame. A referenced file whose content changed since the shard was
written is refused (:class:`ChangedVideoError` naming it).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import decord
import torch
from torch import Tensor

from distill_pl.data.clips import open_video, resize_center_crop
from distill_pl.data.condition_images import decode_image, with_first_frame
from distill_pl.data.controls import ControlSettings
from distill_pl.util.hashing import file_sha256


class ChangedVideoError(ValueError):
    """A referenced video is missing or its content differs from when it was referenced."""


@dataclass(frozen=True)
class ClipSettings:
    """How a clip is cut from its video and its control made (the data settings of the shard
    that references it)."""

    num_frames: int
    frame_stride: int
    height: int
    width: int
    controls: ControlSettings

    @classmethod
    def from_metadata(cls, metadata: dict) -> "ClipSettings":
        return cls(*(metadata[key] for key in ("num_frames", "frame_stride", "height", "width")),
                   ControlSettings.from_metadata(metadata))


class ReferencedClips:
    """Reads referenced clips, checking each video's sha256 once per process.

    A checked file is re-hashed only when its size or modification time changes. At most
    ``max_open`` decord readers are kept open (least recently used closed first), so open
    files stay bounded whatever the number of videos. With ``cache_frames`` every frame of a
    video is decoded once per process, resized and kept with its control, and clips are
    slices of that (small videos only: the cache grows with the number of videos). Picklable
    (DataLoader workers start with no reader, no cache and the checks already done).
    """

    def __init__(self, settings: ClipSettings, max_open: int = 4, cache_frames: bool = False):
        self.settings = settings
        self.max_open = max_open
        self.cache_frames = cache_frames
        self._checked: dict[tuple[str, str], tuple[int, int]] = {}
        self._readers: OrderedDict[str, decord.VideoReader] = OrderedDict()
        self._cache: dict[tuple[str, str | None], tuple[Tensor, Tensor]] = {}
        self._images: dict[str, Tensor] = {}
        self._pid = os.getpid()

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_readers": OrderedDict(), "_cache": {}, "_images": {}}

    def check(self, path: str, sha256: str, where: str) -> None:
        """ChangedVideoError naming ``path`` (and ``where``, the referencing shard) unless the
        file's content has digest ``sha256``."""
        try:
            stat = os.stat(path)
        except OSError:
            raise ChangedVideoError(f"{path}: referenced by {where}, but the video is missing") from None
        stamp = (stat.st_size, stat.st_mtime_ns)
        if self._checked.get((path, sha256)) == stamp:
            return
        found = file_sha256(path)
        if found != sha256:
            raise ChangedVideoError(
                f"{path}: this video changed since {where} referenced it (sha256 {found[:12]}..., "
                f"expected {sha256[:12]}...); restore it or regenerate the shards"
            )
        self._checked[(path, sha256)] = stamp

    def _check_process(self) -> None:
        """A DataLoader worker starts with no reader, frame cache or image of the parent's."""
        if self._pid != os.getpid():
            self._readers, self._cache, self._images, self._pid = OrderedDict(), {}, {}, os.getpid()

    def _reader(self, path: str) -> decord.VideoReader:
        self._check_process()
        if path in self._readers:
            self._readers.move_to_end(path)
        else:
            self._readers[path] = open_video(path)
            while len(self._readers) > self.max_open:
                self._readers.popitem(last=False)
        return self._readers[path]

    def _frames(self, path: str, indices: list[int]) -> Tensor:
        """Frames ``indices`` of ``path`` resized: [3, len(indices), H, W] in [-1, 1]."""
        try:
            frames = torch.from_numpy(self._reader(path).get_batch(indices).asnumpy())
        except Exception as err:  # decord raises its own error types
            raise ChangedVideoError(f"{path}: cannot read frames {indices[:3]}... ({err})") from None
        return resize_center_crop(frames, self.settings.height, self.settings.width)

    def _all_frames(self, path: str) -> Tensor:
        """Every frame of ``path`` resized: [3, F, H, W] in [-1, 1], decoded 32 at a time."""
        total = len(self._reader(path))
        frames = torch.cat([self._frames(path, list(range(i, min(i + 32, total)))) for i in range(0, total, 32)], 1)
        self._readers.pop(path, None)
        return frames

    def _cached(self, path: str, control_path: str | None) -> tuple[Tensor, Tensor]:
        key = (path, control_path)
        if key not in self._cache:
            frames = self._all_frames(path)
            control = (self.settings.controls.compute(frames) if self.settings.controls.computed
                       else self._all_frames(control_path))
            self._cache[key] = (frames, control)
        return self._cache[key]

    def _image(self, path: str) -> Tensor:
        """The conditioning image at ``path`` resized and cropped like the frames: [3, 1, H, W]
        in [-1, 1], decoded once per process."""
        self._check_process()
        if path not in self._images:
            try:
                frame = decode_image(path)
            except Exception as err:  # Pillow raises several error types
                raise ChangedVideoError(f"{path}: cannot read the conditioning image ({err})") from None
            self._images[path] = resize_center_crop(frame, self.settings.height, self.settings.width)
        return self._images[path]

    def read(self, path: str, start: int, control_path: str | None = None,
             image_path: str | None = None) -> tuple[Tensor, Tensor]:
        """(video, control) [3, T, H, W] float32 in [-1, 1] of the clip at ``start`` of ``path``;
        ``control_path``: its control video (``control: video``), ``image_path``: the image
        that replaces the control's first frame (``control: clip``); both checked by
        :meth:`check` first."""
        s = self.settings
        if not s.controls.computed and control_path is None:
            raise ValueError(f"{path}: control: video needs the clip's control video (none referenced)")
        indices = list(range(start, start + (s.num_frames - 1) * s.frame_stride + 1, s.frame_stride))
        if self.cache_frames:
            frames, control = self._cached(path, control_path)
            video, control = frames[:, indices].contiguous(), control[:, indices].contiguous()
        else:
            video = self._frames(path, indices)
            control = s.controls.compute(video) if s.controls.computed else self._frames(control_path, indices)
        if image_path is not None:
            control = with_first_frame(control, self._image(image_path))
        return video, control
