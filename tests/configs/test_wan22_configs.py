"""The Wan2.2-T2V-A14B, Wan2.2-I2V-A14B and Wan2.2-TI2V-5B configs: parsed by the real CLI parser
and their models built on the meta device, from stand-ins of the diffusers folders that hold the
published configs (two experts + boundary_ratio, or expand_timesteps and the Wan 2.2 VAE) and no
weights. Slow set (about 10 s each on 2 cores: 28.6B-parameter teachers, students and fake
scores built on meta); tests/families/test_wan22.py builds the published configs in the default
suite."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
from diffusers import AutoencoderKLWan, WanTransformer3DModel

from distill_pl.families.wan.configs import PUBLISHED, PUBLISHED_VAES
from distill_pl.training.dmd2 import DMD2Module
from distill_pl.training.kd import KDModule
from distill_pl.training.kd_pairs import KDPairGenerationModule, latent_shape
from tests.configs.test_wan_configs import write_stand_in as write_wan21_stand_in
from tests.meta_configs import build_on_meta, num_params, parse, write_model

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


@dataclass(frozen=True)
class Wan22Model:
    """A published Wan 2.2 model: its configs folder, its diffusers folder name, the adapter it
    loads as, its parameter count (both experts), control channels and latents of a video."""

    configs: str
    folder: str
    adapter: str
    num_params: float
    control_channels: int
    latents: tuple[int, int, int, int]


MODELS = {
    "t2v-a14b": Wan22Model("wan2.2-t2v-a14b", "Wan2.2-T2V-A14B-Diffusers", "WanExpertsDenoiser", 28.58e9, 0,
                           (16, 21, 60, 104)),
    "i2v-a14b": Wan22Model("wan2.2-i2v-a14b", "Wan2.2-I2V-A14B-Diffusers", "WanExpertsDenoiser", 28.58e9, 20,
                           (16, 21, 60, 104)),
    "ti2v-5b": Wan22Model("wan2.2-ti2v-5b", "Wan2.2-TI2V-5B-Diffusers", "WanTI2VDenoiser", 5.00e9, 0,
                          (48, 31, 44, 80)),
}


def write_stand_in(root: Path, folder: str) -> None:
    """The diffusers folder ``folder`` with its published configs and empty weight files: the
    Wan 2.1 stand-in with its transformer, plus ``model_index.json`` (boundary_ratio,
    expand_timesteps), ``transformer_2/`` and the Wan 2.2 VAE where the model has them."""
    _, config = PUBLISHED[folder]
    write_wan21_stand_in(root, {"_class_name": "WanTransformer3DModel", **config["transformer"]})
    index = {"_class_name": config.get("pipeline_class", "WanPipeline"), "transformer_2": [None, None],
             "boundary_ratio": config.get("boundary_ratio"), "expand_timesteps": config.get("expand_timesteps", False),
             "transformer": ["diffusers", "WanTransformer3DModel"], "vae": ["diffusers", "AutoencoderKLWan"],
             "scheduler": ["diffusers", "UniPCMultistepScheduler"], "text_encoder": ["transformers", "UMT5EncoderModel"]}
    if "transformer_2" in config:
        index["transformer_2"] = ["diffusers", "WanTransformer3DModel"]
        write_model(root, "transformer_2", {"_class_name": "WanTransformer3DModel", **config["transformer_2"]})
    if folder in PUBLISHED_VAES:
        shutil.rmtree(root / "vae")
        write_model(root, "vae", {"_class_name": "AutoencoderKLWan", **PUBLISHED_VAES[folder]})
    (root / "model_index.json").write_text(json.dumps(index))


@pytest.fixture(params=list(MODELS))
def wan22(request, tmp_path, monkeypatch) -> Wan22Model:
    """cwd = tmp_path holding the model's stand-in folder; from_pretrained builds on the meta device."""
    model = MODELS[request.param]
    monkeypatch.chdir(tmp_path)
    write_stand_in(tmp_path / "checkpoints" / model.folder, model.folder)
    build_on_meta(monkeypatch, (WanTransformer3DModel, AutoencoderKLWan))
    return model


def check_net(net, model: Wan22Model) -> None:
    assert type(net).__name__ == model.adapter
    assert abs(num_params(net) / model.num_params - 1) < 0.01
    assert all(p.device.type == "meta" for p in net.parameters())
    assert net.control_channels == model.control_channels


def check_data(cli, module, model: Wan22Model) -> None:
    h = cli.datamodule.hparams
    assert latent_shape(module.autoencoder, (3, h.num_frames, h.height, h.width)) == model.latents
    assert cli.datamodule.text_dim == 4096
    assert h.control == ("clip" if model.control_channels else "edge")
    if model.control_channels:  # the I2V condition: 4 mask channels + the first frame's latents
        assert module.teacher.encoded_control_channels(module.autoencoder) == model.control_channels


def test_kd_pairs_config(wan22):
    cli = parse(REPO / "configs" / wan22.configs / "kd_pairs.yaml")
    assert isinstance(cli.model, KDPairGenerationModule)
    check_net(cli.model.teacher, wan22)
    check_data(cli, cli.model, wan22)


def test_kd_config(wan22):
    cli = parse(REPO / "configs" / wan22.configs / "kd.yaml")
    kd = cli.model
    assert isinstance(kd, KDModule)
    for net in (kd.teacher, kd.student):
        check_net(net, wan22)
    check_data(cli, kd, wan22)


def test_dmd2_config(wan22):
    cli = parse(REPO / "configs" / wan22.configs / "dmd2.yaml", "--model.init_args.init_from=null")
    dmd2 = cli.model
    assert isinstance(dmd2, DMD2Module)
    for net in (dmd2.teacher, dmd2.student, dmd2.fake_score):
        check_net(net, wan22)
    assert dmd2.feature_block == dmd2.teacher.num_blocks // 2
    check_data(cli, dmd2, wan22)
