"""The Wan2.1-VACE-1.3B and 14B configs: parsed by the real CLI parser and their models built on
the meta device, from a stand-in of the WanVACEPipeline folder that holds the published configs
(diffusers' scripts/convert_wan_to_diffusers.py, "Wan-VACE-1.3B" / "Wan-VACE-14B") and no weights."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
from diffusers import AutoencoderKLWan, WanVACETransformer3DModel

from distill_pl.training.dmd2 import DMD2Module
from distill_pl.training.kd import KDModule
from distill_pl.training.kd_pairs import KDPairGenerationModule
from tests.meta_configs import build_on_meta, check_dmd2_recipe, check_kd_recipe, num_params, parse
from distill_pl.families.wan.configs import WAN_2_1_VACE_1_3B, WAN_2_1_VACE_14B, WAN_VACE_CLASS
from tests.configs.test_wan_configs import check_data, write_stand_in

REPO = Path(__file__).resolve().parents[2]

#: the T2V configs plus the VACE branch (the Wan package's published configs): hints after
#: every 2nd (1.3B) / 5th (14B) block, a context of 2 x 16 latent + 64 mask channels
VACE_1_3B = {"_class_name": WAN_VACE_CLASS, **WAN_2_1_VACE_1_3B}
VACE_14B = {"_class_name": WAN_VACE_CLASS, **WAN_2_1_VACE_14B}


@dataclass(frozen=True)
class VaceModel:
    """A Wan2.1-VACE size: configs folder, the diffusers folder they name, its transformer
    config, VACE blocks, and the range its parameter count must fall in."""

    configs: Path
    folder: str
    transformer_config: dict
    vace_blocks: int
    num_params: tuple[float, float]


MODELS = {
    "1.3b": VaceModel(REPO / "configs/wan2.1-vace-1.3b", "checkpoints/Wan2.1-VACE-1.3B-diffusers",
                      VACE_1_3B, 15, (1.3e9 * 1.3, 1.3e9 * 1.7)),
    "14b": VaceModel(REPO / "configs/wan2.1-vace-14b", "checkpoints/Wan2.1-VACE-14B-diffusers",
                     VACE_14B, 8, (14e9 * 1.15, 14e9 * 1.3)),
}


def write_vace_stand_in(root: Path, transformer_config: dict) -> None:
    """A WanVACEPipeline folder layout: the Wan2.1 stand-in with the VACE transformer and a
    model_index.json."""
    write_stand_in(root, transformer_config)
    (root / "model_index.json").write_text(json.dumps({
        "_class_name": "WanVACEPipeline", "boundary_ratio": None,
        "transformer": ["diffusers", "WanVACETransformer3DModel"], "transformer_2": [None, None],
        "vae": ["diffusers", "AutoencoderKLWan"], "scheduler": ["diffusers", "UniPCMultistepScheduler"],
        "text_encoder": ["transformers", "UMT5EncoderModel"], "tokenizer": ["transformers", "T5TokenizerFast"],
    }))


@pytest.fixture(params=list(MODELS))
def vace(request, tmp_path, monkeypatch) -> VaceModel:
    """cwd = tmp_path holding the model's stand-in folder; from_pretrained builds on the meta device."""
    model = MODELS[request.param]
    monkeypatch.chdir(tmp_path)
    write_vace_stand_in(tmp_path / model.folder, model.transformer_config)
    build_on_meta(monkeypatch, (WanVACETransformer3DModel, AutoencoderKLWan))
    return model


def check_net(net, vace: VaceModel) -> None:
    """A meta-device VACE denoiser of the published size, with the config's conditioning scale."""
    low, high = vace.num_params
    assert net.transformer.device.type == "meta" and low < num_params(net) < high
    assert net.control_channels == 96 and net.latent_channels == 16
    assert len(net.transformer.vace_blocks) == vace.vace_blocks and net.conditioning_scale == 1.0


def test_kd_pairs_config(vace):
    cli = parse(vace.configs / "kd_pairs.yaml")
    model = cli.model
    assert isinstance(model, KDPairGenerationModule)
    assert model.hparams.num_steps == 36 and model.hparams.guidance == 8.0  # Cosmos g = 7
    assert model.hparams.denoiser_options == {"conditioning_scale": 1.0}
    check_net(model.teacher, vace)
    assert model.teacher.encoded_control_channels(model.autoencoder) == 96  # the VAE gives the context
    check_data(cli, model)
    assert cli.config["trainer"]["strategy"] == "ddp"  # generation: no gradients, one teacher per GPU


def test_kd_config(vace):
    cli = parse(vace.configs / "kd.yaml")
    kd = cli.model
    assert isinstance(kd, KDModule)
    check_kd_recipe(cli)
    for net in (kd.teacher, kd.student):
        check_net(net, vace)
    assert kd.student.transformer.gradient_checkpointing and kd.shift == 3.0
    shape = check_data(cli, kd)
    kd.check_pairs_metadata({"latent_shape": list(shape), "num_frames": 81, "height": 480, "width": 832,
                             "vae_path": vace.folder, "guidance": 8.0, "num_steps": 36})


def test_dmd2_config(vace):
    cli = parse(vace.configs / "dmd2.yaml", "--model.init_args.init_from=null")  # no KD checkpoint here
    dmd2 = cli.model
    assert isinstance(dmd2, DMD2Module)
    check_dmd2_recipe(cli)
    h = dmd2.hparams
    assert (h.t_min, h.t_max) == (0.02, 0.98)
    for net in (dmd2.teacher, dmd2.student, dmd2.fake_score):
        check_net(net, vace)
    assert dmd2.feature_block == dmd2.teacher.num_blocks // 2
    check_data(cli, dmd2, mode="clips")
    assert cli.datamodule.hparams.batch_size == h.accumulate_micro_batches  # micro-batches of 1


@pytest.mark.parametrize("size, name", [("14b", "kd.yaml"), ("14b", "dmd2.yaml"), ("1.3b", "dmd2.yaml")])
def test_training_configs_that_ddp_does_not_fit_shard_with_fsdp2(size, name, tmp_path, monkeypatch):
    """14B KD and DMD2, and 1.3B DMD2 (~93 GiB per GPU with DDP), run under FSDP2."""
    monkeypatch.chdir(tmp_path)
    write_vace_stand_in(tmp_path / MODELS[size].folder, MODELS[size].transformer_config)
    build_on_meta(monkeypatch, (WanVACETransformer3DModel, AutoencoderKLWan))
    cli = parse(MODELS[size].configs / name, "--model.init_args.init_from=null" if name == "dmd2.yaml" else "--seed_everything=0")
    found = cli.config["trainer"]["strategy"]
    assert getattr(found, "class_path", found) == "distill_pl.training.strategies.FSDP2Strategy"
