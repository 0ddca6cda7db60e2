"""Conditioning images named in the manifest, for image-to-video models (data setting
``control: clip``).

By default an image-to-video model is given the first frame of its clip. A manifest line may
name another image instead, under ``image`` (a path relative to the manifest's folder, or
absolute)::

    {"path": "videos/a.mp4", "caption": "...", "image": "images/a.png"}

Any still image Pillow opens (PNG, JPEG, WebP, BMP, ...; any mode, converted to RGB) of any
size: it is resized and center cropped exactly as the clip's frames are
(:func:`~distill_pl.data.clips.resize_center_crop`) and replaces the first frame of the clip's
control, the frame the image-to-video adapters take as their image. The clip itself (``video``)
keeps its own frames. With any other control the key is ignored.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

#: the manifest key that names a clip's conditioning image
IMAGE_KEY = "image"


def decode_image(path: str | Path) -> Tensor:
    """The image at ``path`` as one uint8 RGB frame [1, H0, W0, 3] (the layout of decoded
    video frames); Pillow's errors pass through."""
    from PIL import Image

    with Image.open(path) as image:
        rgb = np.asarray(image.convert("RGB"))
    return torch.from_numpy(rgb.copy())[None]


def check_condition_image(image: Path, clip: Path, manifest: Path) -> None:
    """ValueError naming the manifest, the clip and the ``image`` key unless ``image`` exists
    and decodes."""
    where = f"manifest {manifest}: the '{IMAGE_KEY}' of {clip}, {image}"
    if not image.is_file():
        raise ValueError(f"{where}: file not found")
    try:
        decode_image(image)
    except Exception as err:  # Pillow raises several error types
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"{where}: unreadable image ({reason})") from None


def with_first_frame(control: Tensor, image: Tensor) -> Tensor:
    """A new tensor: ``control`` [3, T, H, W] with its first frame replaced by ``image``
    [3, 1, H, W] (the inputs are not modified; with ``control: clip`` the control is the clip
    itself)."""
    if image.shape[0] != control.shape[0] or image.shape[2:] != control.shape[2:]:
        raise ValueError(f"the conditioning image {list(image.shape)} does not fit the control {list(control.shape)}")
    return torch.cat([image.to(control.dtype), control[:, 1:]], dim=1)
