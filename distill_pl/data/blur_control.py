"""Blur control videos (the control signal of Cosmos-Transfer2.5 "Vis"/blur).

Convention: like every control video, [3, T, H, W] (or [B, 3, T, H, W]) in [-1, 1], so a
latent model encodes it with its VAE like the video; here it is the frame itself, blurred.

The filter follows Cosmos-Transfer2.5's inference preprocessing of the blur control at its
default strength ("medium"), each frame on its own, in pixel units 0..255:

1. downsize by :data:`BLUR_DOWNSIZE` (2): area interpolation (the mean of each 2x2 cell);
2. a bilateral filter (:func:`bilateral_filter`) of diameter :data:`BILATERAL_DIAMETER`
   (30: radius 15, a round window), colour sigma :data:`BILATERAL_SIGMA_COLOR` (150) and
   space sigma :data:`BILATERAL_SIGMA_SPACE` (100);
3. back to H x W: bilinear (``align_corners=False``);
4. down to ``int(H / f) x int(W / f)`` and back up, :data:`DOWNUP_FACTOR` f = 10, both
   bicubic with antialiasing (torch's cubic, a = -0.75); then clamped to the value range.

Where ours differs: it runs in float32 at the training size, with no rounding to uint8
between the steps (theirs: uint8 frames through OpenCV at the input video's size); the area
downsize is torch's (for an odd size OpenCV's weighs partial pixels); a step that leaves
fewer than 1 pixel keeps 1; on a frame smaller than the bilateral window, taps
farther than one reflection are left out.

Frames are processed in chunks of at most :data:`BLUR_CHUNK_BYTES` of working memory;
frames are independent, so the result does not depend on the chunking.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

#: step 1: downsize factor before the bilateral filter
BLUR_DOWNSIZE = 2
#: step 2: the bilateral filter's diameter (pixels; radius = diameter // 2) and sigmas (colour
#: in 0..255 units of the L1 distance over the 3 channels; space in pixels)
BILATERAL_DIAMETER = 30
BILATERAL_SIGMA_COLOR = 150.0
BILATERAL_SIGMA_SPACE = 100.0
#: step 4: the down-and-up factor
DOWNUP_FACTOR = 10
#: working memory of one chunk of frames (about 8 float32 planes of 3 channels per frame)
BLUR_CHUNK_BYTES = 256 * 2**20
_PLANES_PER_FRAME = 8


def bilateral_filter(frames: Tensor, diameter: int, sigma_color: float, sigma_space: float) -> Tensor:
    """Bilateral filter of ``frames`` [N, C, H, W] (values in 0..255 units), as OpenCV's
    ``bilateralFilter`` defines it: the output at p is the weighted mean of the pixels q with
    ``|q - p| <= diameter // 2`` (a round window), weight
    ``exp(-|q - p|^2 / (2 sigma_space^2)) * exp(-d(q, p)^2 / (2 sigma_color^2))`` with ``d``
    the sum over channels of the absolute differences; the border is reflected without
    repeating the edge pixel (OpenCV's BORDER_REFLECT_101). Same shape and dtype."""
    radius = diameter // 2
    n, c, h, w = frames.shape
    x = frames.float()
    pad = min(radius, h - 1, w - 1)  # reflection needs pad < size; farther taps use the clamped pad
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect") if pad else x
    total = torch.zeros_like(x)
    weights = torch.zeros(n, 1, h, w, dtype=torch.float32, device=frames.device)
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            if dy * dy + dx * dx > radius * radius or abs(dy) > pad or abs(dx) > pad:
                continue
            q = padded[..., pad + dy : pad + dy + h, pad + dx : pad + dx + w]
            colour = (q - x).abs().sum(1, keepdim=True)
            weight = torch.exp(-(dy * dy + dx * dx) / (2 * sigma_space**2) - colour**2 / (2 * sigma_color**2))
            total += weight * q
            weights += weight
    return (total / weights).to(frames.dtype)


def _blur_frames(frames: Tensor) -> Tensor:
    """Steps 1-4 of the module docstring on frames [N, 3, H, W] in 0..255 (float32)."""
    h, w = frames.shape[-2:]
    small = F.interpolate(frames, size=(max(1, h // BLUR_DOWNSIZE), max(1, w // BLUR_DOWNSIZE)), mode="area")
    small = bilateral_filter(small, BILATERAL_DIAMETER, BILATERAL_SIGMA_COLOR, BILATERAL_SIGMA_SPACE)
    x = F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False)
    coarse = (max(1, int(h / DOWNUP_FACTOR)), max(1, int(w / DOWNUP_FACTOR)))
    x = F.interpolate(x, size=coarse, mode="bicubic", antialias=True, align_corners=False)
    return F.interpolate(x, size=(h, w), mode="bicubic", antialias=True, align_corners=False)


def blur_control(video: Tensor) -> Tensor:
    """Blur control of ``video`` [3, T, H, W] or [B, 3, T, H, W] in [-1, 1] (the module
    docstring's filter); same shape and dtype, in [-1, 1]."""
    if video.ndim not in (4, 5) or video.shape[-4] != 3:
        raise ValueError(f"expected a video [B?, 3, T, H, W], got shape {tuple(video.shape)}")
    batched = video if video.ndim == 5 else video.unsqueeze(0)
    b, _, t, h, w = batched.shape
    frames = batched.transpose(1, 2).reshape(b * t, 3, h, w)
    per_chunk = max(1, BLUR_CHUNK_BYTES // (h * w * 3 * 4 * _PLANES_PER_FRAME))
    out = torch.empty(b * t, 3, h, w, dtype=video.dtype, device=video.device)
    for lo in range(0, b * t, per_chunk):
        pixels = (frames[lo : lo + per_chunk].float() + 1) * 127.5
        out[lo : lo + per_chunk] = (_blur_frames(pixels) / 127.5 - 1).clamp(-1, 1)
    control = out.reshape(b, t, 3, h, w).transpose(1, 2).contiguous()
    return control if video.ndim == 5 else control[0]


#: the recipe as ``student.json`` records it (:mod:`distill_pl.export.student_settings`)
BLUR_RECIPE = {
    "pixels": "(frame + 1) * 127.5, float32, each frame on its own",
    "downsize": {"factor": BLUR_DOWNSIZE, "interpolation": "torch.nn.functional.interpolate(mode='area')"},
    "bilateral": {"diameter": BILATERAL_DIAMETER, "sigma_color": BILATERAL_SIGMA_COLOR,
                  "sigma_space": BILATERAL_SIGMA_SPACE, "window": "round (|q - p| <= diameter // 2)",
                  "colour_distance": "sum over channels of |q - p|", "border": "reflect_101"},
    "upsize": "bilinear, align_corners=False, back to height x width",
    "downup": {"factor": DOWNUP_FACTOR, "size": "(int(height / factor), int(width / factor)), at least 1",
               "interpolation": "bicubic, antialias=True, align_corners=False, down then up"},
    "to_range": "x / 127.5 - 1, clamped to [-1, 1]",
}
