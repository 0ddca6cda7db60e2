"""Turn video tensors into things a person looks at: mp4 files, PNG frame grids.

Videos are [3, T, H, W] float tensors in [-1, 1] (pixel space). Files are written
atomically (temp file in the same folder, then rename).
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from torch import Tensor


def to_uint8(video: Tensor) -> Tensor:
    """[-1, 1] float -> [0, 255] uint8, same shape."""
    return ((video.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()


def grid_frame_indices(num_frames: int) -> tuple[int, int, int]:
    """The grid's three columns: first, middle and last frame."""
    return 0, num_frames // 2, num_frames - 1


def frame_grid(rows: Sequence[Tensor], pad: int = 2, pad_value: int = 255) -> Tensor:
    """Rows of videos [3, T, H, W] -> one uint8 image [3, R*(H+pad)-pad, 3*(W+pad)-pad].

    Row r, column c holds frame ``grid_frame_indices(T)[c]`` of ``rows[r]``; rows with one
    channel are shown in grey. All rows must share T, H and W.
    """
    if not rows:
        raise ValueError("frame_grid needs at least one row")
    _, t, h, w = rows[0].shape
    cols = grid_frame_indices(t)
    out = torch.full(
        (3, len(rows) * (h + pad) - pad, len(cols) * (w + pad) - pad), pad_value, dtype=torch.uint8
    )
    for r, video in enumerate(rows):
        if video.shape[1:] != (t, h, w):
            raise ValueError(f"row {r} has shape {tuple(video.shape)}, expected (*, {t}, {h}, {w})")
        frames = to_uint8(video.expand(3, -1, -1, -1) if video.shape[0] == 1 else video)
        for c, f in enumerate(cols):
            y, x = r * (h + pad), c * (w + pad)
            out[:, y : y + h, x : x + w] = frames[:, f]
    return out


def side_by_side(videos: Sequence[Tensor], pad: int = 2, pad_value: float = 1.0) -> Tensor:
    """Videos [3, T, H, W] in [-1, 1] of equal T and H -> one [3, T, H, sum W + gaps] video,
    left to right, ``pad`` columns of ``pad_value`` (white) between them."""
    c, t, h, _ = videos[0].shape
    gap = torch.full((c, t, h, pad), pad_value, dtype=videos[0].dtype)
    parts = [part for video in videos for part in (video.detach().cpu(), gap)][:-1]
    return torch.cat(parts, dim=-1)


def label_rows(image: Tensor, labels: Sequence[str], row_height: float, width: int = 150) -> Tensor:
    """Prepend a white margin to a uint8 [3, H, W] image with ``labels[r]`` written at the
    height of row ``r`` (rows ``row_height`` pixels apart)."""
    from PIL import Image, ImageDraw

    margin = Image.new("RGB", (width, image.shape[1]), "white")
    draw = ImageDraw.Draw(margin)
    for r, text in enumerate(labels):
        draw.text((4, int(r * row_height + row_height / 2) - 5), text, fill="black")
    return torch.cat([torch.from_numpy(np.array(margin)).permute(2, 0, 1), image], dim=2)


def upscale(image_or_video: Tensor, factor: int) -> Tensor:
    """Nearest-neighbour upscaling of the last two dims (tiny videos are 32 px wide)."""
    if factor == 1:
        return image_or_video
    return image_or_video.repeat_interleave(factor, -1).repeat_interleave(factor, -2)


def default_file_mode() -> int:
    """The mode ``open()`` gives a new file: 0o666 less the process's umask."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def follow_umask(root: str | Path) -> None:
    """Give ``root`` and everything under it the modes the umask gives new entries: files
    :func:`default_file_mode` (keeping those of their execute bits the umask allows), folders
    0o777 less the umask. For trees written by libraries that create files 0600
    (safetensors) or folders 0700 (``tempfile.mkdtemp``). Symbolic links are left alone."""
    mask = os.umask(0o022)
    os.umask(mask)
    file_mode, folder_mode = 0o666 & ~mask, 0o777 & ~mask
    root = Path(root)
    entries = [root, *root.rglob("*")] if root.is_dir() else [root]
    for entry in entries:
        if entry.is_symlink():
            continue
        if entry.is_dir():
            os.chmod(entry, folder_mode)
        elif entry.is_file():
            os.chmod(entry, file_mode | (entry.stat().st_mode & 0o111 & folder_mode))


@contextlib.contextmanager
def atomic_write(path: str | Path, durable: bool = False) -> Iterator[Path]:
    """Yield a temporary file in ``path``'s folder to write; on success it replaces
    ``path`` (rename) with the usual permissions (umask, not the temp file's 0600), on
    error it is removed, so ``path`` is never half written.

    The temp file is ``.<name>.<random><suffix>`` in the same folder (so the rename never
    crosses filesystems). ``durable``: the file is fsynced before the rename and the folder
    after it, so a crash or power loss leaves the old or the new file, never a torn one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.chmod(tmp, default_file_mode())
        if durable:
            _fsync(tmp)
        os.replace(tmp, path)
        if durable:
            _fsync(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_folder(path: str | Path) -> Iterator[Path]:
    """Yield a folder path to write (not yet created) inside a temporary folder beside
    ``path`` (``.<name>.<random>``, so the rename never crosses filesystems). On success it
    takes ``path``'s place: an absent or empty ``path`` by one rename (``path`` is then whole
    or absent, never half written); an existing ``path`` has each of the written entries
    replaced whole (the old entry moved aside first, then removed), its other entries kept.
    On error the temporary folder is removed and ``path`` is left as it was; one left by a
    killed writer is removed by the next write of ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{glob.escape(path.name)}.*"):
        if stale.is_dir() and len(stale.name) == len(path.name) + 10:  # ".<name>." + mkdtemp's 8 characters
            shutil.rmtree(stale, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    target = staging / path.name
    try:
        yield target
        target.mkdir(exist_ok=True)
        follow_umask(target)  # safetensors writes 0600 files
        if not path.is_dir() or not any(path.iterdir()):
            os.replace(target, path)
        else:
            aside = staging / ".old"
            aside.mkdir()
            for entry in sorted(target.iterdir()):
                if (path / entry.name).exists() or (path / entry.name).is_symlink():
                    os.replace(path / entry.name, aside / entry.name)
                os.replace(entry, path / entry.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text(path: str | Path, text: str) -> Path:
    """Write a UTF-8 text file (atomically)."""
    with atomic_write(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_png(path: str | Path, image: Tensor) -> Path:
    """Write a uint8 [3, H, W] image as PNG (atomically)."""
    from PIL import Image

    with atomic_write(path) as tmp:
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(tmp, format="PNG")
    return Path(path)


def write_mp4(path: str | Path, video: Tensor, fps: int = 8, scale: int = 1) -> Path:
    """Write a [3, T, H, W] video in [-1, 1] as H.264 mp4 with PyAV (atomically)."""
    import av

    frames = upscale(to_uint8(video), scale).permute(1, 2, 3, 0).numpy()  # [T, H, W, 3]
    h, w = frames.shape[1:3]
    if h % 2 or w % 2:  # yuv420p needs even sizes
        frames = np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    with atomic_write(path) as tmp, av.open(str(tmp), mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "18"}
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return Path(path)
