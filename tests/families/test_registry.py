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


def test_every_family_is_one_package_and_its_published_configs_build():
    """Each registry line points into a family package; the packages' ``configs.PUBLISHED``
    name registered classes and build on the meta device."""
    from distill_pl.families.registry import family_packages, published_configs

    assert family_packages() == ["distill_pl.families.wan", "distill_pl.families.cosmos_transfer"]
    published = published_configs()
    assert list(published) == ["Wan2.1-T2V-1.3B-Diffusers", "Wan2.1-T2V-14B-Diffusers", "Wan2.2-T2V-A14B-Diffusers",
                               "Wan2.2-I2V-A14B-Diffusers", "Wan2.2-TI2V-5B-Diffusers", "Cosmos-Transfer2.5-2B",
                               "Cosmos-Predict2.5-2B"]
    for class_name, config in published.values():
        assert class_name in FAMILIES
    class_name, config = published["Wan2.1-T2V-1.3B-Diffusers"]
    net = build_denoiser(class_name, config, on_meta=True)
    assert sum(p.numel() for p in net.parameters()) == 1_418_996_800


def test_text_encoder_is_picked_by_model_type(tmp_path):
    """A registered ``model_type`` gets its family's encoder (recipe and D from the config);
    any other model the generic one."""
    from distill_pl.families.cosmos_transfer.text_encoder import CosmosTextEncoder
    from distill_pl.families.registry import text_embedding_dim, text_embedding_recipe, text_encoder_class, text_encoders
    from distill_pl.models.text_encoder import TextEncoder

    assert text_encoders() == {"qwen2_5_vl": "distill_pl.families.cosmos_transfer.text_encoder:CosmosTextEncoder"}
    write_json(tmp_path / "t5/config.json", {"model_type": "t5", "d_model": 24})
    write_json(tmp_path / "qwen/config.json", {"model_type": "qwen2_5_vl",
                                                "text_config": {"hidden_size": 8, "num_hidden_layers": 3}})
    assert text_encoder_class(tmp_path / "t5") is TextEncoder
    assert text_encoder_class(tmp_path / "qwen") is CosmosTextEncoder
    assert (text_embedding_dim(tmp_path / "t5"), text_embedding_dim(tmp_path / "qwen")) == (24, 24)
    assert text_embedding_recipe(tmp_path / "t5").startswith("last_hidden_state")
    assert text_embedding_recipe(tmp_path / "qwen").startswith("Cosmos2_5_TransferPipeline.encode_prompt")
