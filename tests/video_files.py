"""Small mp4 files written with PyAV for tests that need videos of their own."""

from __future__ import annotations

from pathlib import Path

import numpy as np

#: frames per second of the written videos
RATE = 8


def write_frames(path: Path, frames: list[np.ndarray]) -> Path:
    """An mp4 (libx264, yuv420p, :data:`RATE` fps) of uint8 RGB ``frames`` [H, W, 3]."""
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=RATE)
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return path


def _square_left(t: int, size: int) -> int:
    """Left edge of the moving square in frame ``t``."""
    return (t * 2) % (size - size // 4)


def write_test_video(path: Path, num_frames: int, size: int = 32, seed: int = 0) -> Path:
    """An mp4 of ``num_frames`` frames: a bright square moving over a noisy background.

    decord fails on random access into very small videos (seen at 16 to 48 pixels), so tests
    that read frames other than the first use ``size`` 64."""
    rng = np.random.default_rng(seed)
    background = rng.integers(0, 80, (size, size, 3), dtype=np.uint8)
    frames = []
    for t in range(num_frames):
        frame = background.copy()
        x = _square_left(t, size)
        frame[size // 4: size // 2, x: x + size // 4] = (230, 200, 40)
        frames.append(frame)
    return write_frames(path, frames)


def write_depth_video(path: Path, num_frames: int, size: int = 64) -> Path:
    """The depth control of :func:`write_test_video`'s video of the same ``num_frames`` and
    ``size`` (same frame rate), as a depth estimator renders one: grey, near = bright; the
    background a plane receding from the bottom row (near) to the top row (far), the moving
    square in front of it."""
    rows = np.linspace(30, 140, size)[:, None, None]
    background = np.broadcast_to(rows, (size, size, 3)).astype(np.uint8)
    frames = []
    for t in range(num_frames):
        frame = background.copy()
        x = _square_left(t, size)
        frame[size // 4: size // 2, x: x + size // 4] = 235
        frames.append(frame)
    return write_frames(path, frames)
