"""The padding-mask resize diffusers' Cosmos models need, without torchvision.

``CosmosTransformer3DModel`` (with ``concat_padding_mask``) and ``CosmosControlNetModel``
resize their ``padding_mask`` [B, 1, H, W] to the latent grid with
``torchvision.transforms.functional.resize(..., interpolation=NEAREST)``, and fail with a
``NameError`` when torchvision is not installed (PyPI's torchvision does not import beside a
CPU build of torch). For a tensor, torchvision's nearest resize is
``torch.nn.functional.interpolate(mask, size, mode="nearest")``; :func:`install` gives the two
diffusers modules exactly that when torchvision is missing, and changes nothing when it is
there.
"""

from __future__ import annotations

from enum import Enum
from types import SimpleNamespace

import torch
from torch import Tensor


class InterpolationMode(Enum):
    """The one mode the Cosmos models use (torchvision's enum values are the mode names)."""

    NEAREST = "nearest"


def resize(mask: Tensor, size: list[int], interpolation: InterpolationMode = InterpolationMode.NEAREST) -> Tensor:
    """``mask`` [..., H, W] resized to ``size`` = [H', W'] by nearest-neighbour lookup."""
    if interpolation is not InterpolationMode.NEAREST:
        raise ValueError(f"only nearest resizing is provided, got {interpolation}")
    flat = mask.reshape(-1, 1, *mask.shape[-2:])
    return torch.nn.functional.interpolate(flat, size=list(size), mode="nearest").reshape(
        *mask.shape[:-2], *size
    )


def install() -> None:
    """Give diffusers' Cosmos transformer and ControlNet modules a ``transforms`` namespace
    with :func:`resize` if they have none (torchvision not installed)."""
    from diffusers.models.controlnets import controlnet_cosmos
    from diffusers.models.transformers import transformer_cosmos

    transforms = SimpleNamespace(
        functional=SimpleNamespace(resize=resize), InterpolationMode=InterpolationMode
    )
    for module in (transformer_cosmos, controlnet_cosmos):
        if not hasattr(module, "transforms"):
            module.transforms = transforms
