"""find_diffusers_model_folder: which folders load, and the error for each that does not."""

import json

import pytest
from safetensors.torch import save_file

from distill_pl.models.loading import ModelFolderError, find_diffusers_model_folder, parse_dtype

CLASS = "WanTransformer3DModel"


def make_model_folder(folder, class_name=CLASS, weights="diffusion_pytorch_model.safetensors"):
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"_class_name": class_name}))
    if weights:
        save_file({}, str(folder / weights))  # a valid header without tensors
    return folder


def find(path):
    return find_diffusers_model_folder(str(path), CLASS, "transformer")


def test_model_folder_and_pipeline_root(tmp_path):
    model = make_model_folder(tmp_path / "model")
    assert find(model) == model
    transformer = make_model_folder(tmp_path / "pipeline" / "transformer")
    (tmp_path / "pipeline" / "model_index.json").write_text("{}")
    assert find(tmp_path / "pipeline") == transformer


def test_missing_folder(tmp_path):
    with pytest.raises(ModelFolderError, match="does not exist") as error:
        find(tmp_path / "absent")
    assert str(tmp_path / "absent") in str(error.value)


def test_hub_id_is_not_looked_up(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelFolderError, match="does not exist.*local") as error:
        find("Wan-AI/Wan2.1-T2V-1.3B-Diffusers")
    assert "Wan-AI/Wan2.1-T2V-1.3B-Diffusers" in str(error.value)


def test_no_config(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelFolderError, match="no config.json") as error:
        find(tmp_path / "empty")
    assert str(tmp_path / "empty") in str(error.value)


def test_config_not_json(tmp_path):
    folder = make_model_folder(tmp_path / "model")
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ModelFolderError, match="not valid JSON") as error:
        find(folder)
    assert str(folder) in str(error.value)


def test_wrong_class(tmp_path):
    folder = make_model_folder(tmp_path / "vae", class_name="AutoencoderKLWan")
    expected = "'AutoencoderKLWan'.*expected 'WanTransformer3DModel'"
    with pytest.raises(ModelFolderError, match=expected) as error:
        find(folder)
    assert str(folder) in str(error.value)


def test_no_weights(tmp_path):
    folder = make_model_folder(tmp_path / "model", weights=None)
    with pytest.raises(ModelFolderError, match=r"no \*.safetensors") as error:
        find(folder)
    assert str(folder) in str(error.value)


def test_bin_only_weights(tmp_path):
    folder = make_model_folder(tmp_path / "model", weights="diffusion_pytorch_model.bin")
    expected = "diffusion_pytorch_model.bin; safetensors weights are required"
    with pytest.raises(ModelFolderError, match=expected) as error:
        find(folder)
    assert str(folder) in str(error.value)


def test_parse_dtype():
    assert str(parse_dtype("bfloat16")) == "torch.bfloat16"
    with pytest.raises(ValueError, match="float64"):
        parse_dtype("float64")
