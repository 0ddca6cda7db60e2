"""Precomputed control videos named in the manifest (data setting ``control: video``).

A manifest line names its clip's control videos by key::

    {"path": "videos/a.mp4", "caption": "...", "controls": {"depth": "depth/a.mp4"}}

and ``control_key: depth`` picks one. The control video must match its clip frame for frame:
the same number of frames, the same frame size (height x width) and the same frame rate; it
is checked when the clip is probed, and a mismatch (or a missing control) is one error line
naming both files. Its frames are read with the clip's window (the same indices: start,
frame stride) and resized and cropped like the clip, so control frame k belongs to clip frame k.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

from distill_pl.data.manifest import ManifestEntry


class VideoFormat(NamedTuple):
    """What a control video must share with its clip: frames, height, width, frames per second."""

    frames: int
    height: int
    width: int
    fps: float


def video_format(reader) -> VideoFormat:
    """The :class:`VideoFormat` of an open decord reader (decodes its first frame)."""
    height, width = reader[0].shape[:2]
    return VideoFormat(len(reader), int(height), int(width), float(reader.get_avg_fps()))


def control_video_path(entry: ManifestEntry, key: str, manifest: Path) -> Path:
    """The control video ``key`` of ``entry``; ValueError naming the manifest, the clip and
    the key when the line does not name one."""
    if key not in entry.controls:
        named = ", ".join(sorted(entry.controls)) or "none"
        raise ValueError(f"manifest {manifest}: {entry.path} has no control video '{key}' (data.control_key; "
                         f"its controls: {named})")
    return entry.controls[key]


def check_control_video(clip: Path, clip_format: VideoFormat, control: Path, open_video) -> None:
    """ValueError naming ``control`` and ``clip`` unless the control video (opened with
    ``open_video``) exists, decodes and has the clip's frame count, size and frame rate."""
    if not control.is_file():
        raise ValueError(f"control video {control} of {clip}: file not found")
    try:
        found = video_format(open_video(control))
    except Exception as err:  # decord raises its own error types
        raise ValueError(f"control video {control} of {clip}: unreadable ({str(err).strip().splitlines()[0]})") from None
    differences = [f"{name} {theirs} != {ours}" for name, theirs, ours in zip(VideoFormat._fields, found, clip_format)
                   if (abs(theirs - ours) > 1e-3 if name == "fps" else theirs != ours)]
    if differences:
        raise ValueError(f"control video {control} does not match its clip {clip}: {', '.join(differences)} "
                         f"(control != clip)")
