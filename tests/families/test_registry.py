"""The family registry: which adapter a folder gets, and the errors for folders it cannot serve."""

import json

import pytest
import torch

from distill_pl.models.conditioning import Conditioning
from distill_pl.families.registry import (
    FAMILIES,
    build_denoiser,
    denoiser_config,
    folder_class_name,
    load_denoiser,
)
from distill_pl.models.loading import ModelFolderError
from distill_pl.models.sharding import denoiser_from_state_dict

TINY = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=6, out_channels=3,
            text_dim=16, freq_dim=16, ffn_dim=32, num_layers=2)


def write_json(file, data):
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_text(json.dumps(data))


def test_class_name_from_each_folder_layout(tmp_path):
    write_json(tmp_path / "pipe/model_index.json", {"_class_name": "WanVACEPipeline",
                                                    "transformer": ["diffusers", "WanVACETransformer3DModel"]})
    write_json(tmp_path / "teacher/transformer/config.json", {"_class_name": "WanTransformer3DModel"})
    write_json(tmp_path / "model/config.json", {"_class_name": "WanTransformer3DModel"})
    assert folder_class_name(tmp_path / "pipe") == "WanVACETransformer3DModel"
    assert folder_class_name(tmp_path / "teacher") == folder_class_name(tmp_path / "model") == "WanTransformer3DModel"


def test_unsupported_class_is_one_line_naming_the_folder_and_the_supported_classes(tmp_path):
    write_json(tmp_path / "model_index.json", {"transformer": ["diffusers", "SomeOtherTransformer"]})
    with pytest.raises(ModelFolderError) as error:
        load_denoiser(tmp_path)
    message = str(error.value)
    assert "\n" not in message and str(tmp_path) in message and "'SomeOtherTransformer'" in message
    assert all(name in message for name in FAMILIES)


def test_folder_without_a_model_is_an_error_naming_it(tmp_path):
    with pytest.raises(ModelFolderError, match=f"^{tmp_path}: no model_index.json"):
        folder_class_name(tmp_path)
    write_json(tmp_path / "model_index.json", {"vae": ["diffusers", "AutoencoderKLWan"]})
    with pytest.raises(ModelFolderError, match="no 'transformer' entry"):
        folder_class_name(tmp_path)


def test_build_load_and_rebuild_from_a_state_dict(tmp_path):
    torch.manual_seed(0)
    denoiser = build_denoiser("WanTransformer3DModel", TINY)
    denoiser.save_pretrained(str(tmp_path / "transformer"))
    assert denoiser_config(tmp_path) == ("WanTransformer3DModel", json.loads(json.dumps(denoiser.backbone_config)))
    loaded = load_denoiser(tmp_path, dtype="bfloat16")
    assert loaded.blocks[0].attn1.to_q.weight.dtype == torch.bfloat16
    meta = build_denoiser(*denoiser_config(tmp_path), on_meta=True)
    assert all(p.is_meta for p in meta.parameters())
    copy = denoiser_from_state_dict(meta, denoiser.state_dict())
    assert not any(t.is_meta for t in [*copy.parameters(), *copy.buffers()])
    x = torch.randn(1, 3, 2, 4, 4)
    cond = Conditioning(torch.randn(1, 5, 16), None, torch.randn(1, 3, 2, 4, 4))
    sigma = torch.tensor([0.5])
    with torch.no_grad():
        assert torch.equal(copy(x, sigma, cond), denoiser(x, sigma, cond))
