"""Canny-edge control videos (the control signal of Cosmos-Transfer "Edge").

Convention: a control video has the layout and value range of a video, [3, T, H, W] (or
[B, 3, T, H, W]) in [-1, 1], so a latent model encodes it with its VAE like the video. Each
frame's canny edge map (of the grey frame in [0, 1]) is replicated to the 3 channels, with
-1 = no edge and +1 = edge; no other values occur.

Frames are processed in chunks of at most :data:`CANNY_CHUNK_BYTES` of kornia's working
memory (about 64 float32 planes per frame), so long high-resolution videos stay bounded in
memory; frames are independent, so the result does not depend on the chunking.
"""

from __future__ import annotations

import kornia
import torch
from torch import Tensor

#: the Gaussian blur of every control the project builds: kernel size and sigma (pixels)
CANNY_KERNEL_SIZE = 5
CANNY_SIGMA = 1.0
#: a pixel is an edge where kornia's canny output (0 or 1 after hysteresis) exceeds this
EDGE_THRESHOLD = 0.5
#: working memory of one canny chunk (kornia's canny keeps about 64 float32 planes per frame)
CANNY_CHUNK_BYTES = 512 * 2**20
_PLANES_PER_FRAME = 64


def canny_control(
    video: Tensor,
    low_threshold: float = 0.1,
    high_threshold: float = 0.2,
    kernel_size: int = CANNY_KERNEL_SIZE,
    sigma: float = CANNY_SIGMA,
) -> Tensor:
    """Edge control of ``video`` [3, T, H, W] or [B, 3, T, H, W] in [-1, 1]; same shape and dtype.

    Thresholds, ``kernel_size`` and ``sigma`` are those of :func:`kornia.filters.canny`
    (thresholds compare against the unnormalised Sobel magnitude of the blurred grey frame
    in [0, 1]: a unit step reaches about 2.6 with the default blur).
    """
    if video.ndim not in (4, 5) or video.shape[-4] != 3:
        raise ValueError(f"expected a video [B?, 3, T, H, W], got shape {tuple(video.shape)}")
    batched = video if video.ndim == 5 else video.unsqueeze(0)
    b, _, t, h, w = batched.shape
    frames = batched.transpose(1, 2).reshape(b * t, 3, h, w)
    per_chunk = max(1, CANNY_CHUNK_BYTES // (h * w * 4 * _PLANES_PER_FRAME))
    edges = torch.empty(b * t, 1, h, w, dtype=torch.bool, device=video.device)
    for lo in range(0, b * t, per_chunk):
        grey = kornia.color.rgb_to_grayscale(((frames[lo : lo + per_chunk].float() + 1) / 2).clamp(0, 1))
        _, chunk = kornia.filters.canny(
            grey, low_threshold, high_threshold, (kernel_size, kernel_size), (sigma, sigma)
        )
        edges[lo : lo + per_chunk] = chunk > EDGE_THRESHOLD
    control = edges.to(video.dtype) * 2 - 1  # [B*T, 1, H, W]
    control = control.reshape(b, t, 1, h, w).transpose(1, 2).expand(b, 3, t, h, w).contiguous()
    return control if video.ndim == 5 else control[0]
