"""The torchvision-free nearest resize given to diffusers' Cosmos modules."""

import pytest
import torch
from diffusers.models.controlnets import controlnet_cosmos
from diffusers.models.transformers import transformer_cosmos

from distill_pl.families.cosmos_transfer import padding_resize as cosmos_padding_resize
from distill_pl.families.cosmos_transfer.padding_resize import resize


def test_nearest_resize_picks_source_pixels():
    mask = torch.arange(16.0).view(1, 1, 4, 4)
    assert resize(mask, [2, 2]).tolist() == [[[[0.0, 2.0], [8.0, 10.0]]]]
    assert resize(mask, [8, 8])[0, 0, ::2, ::2].tolist() == mask[0, 0].tolist()
    assert torch.equal(resize(mask, [4, 4]), mask)
    with pytest.raises(ValueError, match="only nearest"):
        resize(mask, [2, 2], interpolation="bilinear")


def test_install_gives_both_modules_the_resize():
    cosmos_padding_resize.install()
    for module in (transformer_cosmos, controlnet_cosmos):
        out = module.transforms.functional.resize(
            torch.ones(1, 1, 8, 8), [4, 4], interpolation=module.transforms.InterpolationMode.NEAREST
        )
        assert out.shape == (1, 1, 4, 4)
