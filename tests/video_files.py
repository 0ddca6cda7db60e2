"""Small mp4 files written with PyAV for tests that need videos of their own."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def write_test_video(path: Path, num_frames: int, size: int = 32, seed: int = 0) -> Path:
    """An mp4 of ``num_frames`` frames: a bright square moving over a noisy background.

    decord fails on random access into very small videos (seen at 16 to 48 pixels), so tests
    that read frames other than the first use ``size`` 64."""
    import av

    rng = np.random.default_rng(seed)
    background = rng.integers(0, 80, (size, size, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=8)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for t in range(num_frames):
            frame = background.copy()
            x = (t * 2) % (size - size // 4)
            frame[size // 4: size // 2, x: x + size // 4] = (230, 200, 40)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return path
