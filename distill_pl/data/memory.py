"""Host memory of reading clips (the data side of ``distill-pl estimate-memory``).

One item of :class:`~distill_pl.data.clips.ClipDataset` without ``cache_frames`` holds, at
its peak: the decoded window (``T x H0 x W0 x 3`` uint8 at the source resolution), one resize
chunk (float32 source pixels, at most ``RESIZE_CHUNK_BYTES``) with its interpolated copy, the
float32 clip and control (``2 x 3 x T x H x W x 4`` bytes) and one canny chunk (at most
``CANNY_CHUNK_BYTES``). A loader keeps ``prefetch_factor`` (2) batches per worker in flight,
plus the collated batch. ``cache_frames`` adds the float32 frames and control of each cached
video's whole split part.
"""

from __future__ import annotations

from distill_pl.data.clips import RESIZE_CHUNK_BYTES
from distill_pl.data.control import _PLANES_PER_FRAME, CANNY_CHUNK_BYTES

GIB = 2**30


def clip_output_bytes(num_frames: int, height: int, width: int) -> int:
    """float32 clip + control of one item."""
    return 2 * 3 * num_frames * height * width * 4


def clip_item_bytes(num_frames: int, height: int, width: int, source: tuple[int, int] = (1080, 1920)) -> int:
    """Peak bytes of reading one clip item (see the module docstring); ``source`` = (H0, W0)."""
    h0, w0 = source
    decoded = num_frames * h0 * w0 * 3
    frame_float = h0 * w0 * 3 * 4
    chunk_frames = min(num_frames, max(1, RESIZE_CHUNK_BYTES // frame_float))
    scale = max(height / h0, width / w0)
    resized = chunk_frames * 3 * max(height, round(h0 * scale)) * max(width, round(w0 * scale)) * 4
    outputs = clip_output_bytes(num_frames, height, width)
    canny = min(num_frames * height * width * 4 * _PLANES_PER_FRAME, CANNY_CHUNK_BYTES)
    return decoded + chunk_frames * frame_float + resized + outputs + canny


def data_memory_line(data, source: tuple[int, int] = (1080, 1920)) -> str:
    """One line on the host memory of a config's data side (``data``: its parsed ``data:``)."""
    item = clip_item_bytes(data.num_frames, data.height, data.width, source)
    batch = data.batch_size
    # per reading process: the item in progress + the batches it has prefetched (2, DataLoader's default)
    per_process = item + 2 * batch * clip_output_bytes(data.num_frames, data.height, data.width)
    mode = getattr(data, "mode", "clips")
    line = (f"data (host RAM, {mode} mode reading clips of {source[1]}x{source[0]} sources): one "
            f"{data.num_frames}x{data.height}x{data.width} item {item / GIB:.2f} GiB at its peak; up to "
            f"{per_process / GIB:.2f} GiB per loader process with 2 prefetched batches of {batch} "
            f"(x {max(1, data.num_workers)} worker processes)")
    if getattr(data, "cache_frames", False):
        cached = 2 * 3 * 1000 * data.height * data.width * 4
        line += f"; cache_frames adds {cached / GIB:.2f} GiB per 1000 cached frames per process"
    return line
