"""The Cosmos-Transfer2.5-2B configs: parsed by the real CLI parser and their models built on the
meta device, from a stand-in of the diffusers pipeline folder that holds configs and no weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKLWan, CosmosControlNetModel, CosmosTransformer3DModel
from diffusers.pipelines.cosmos.pipeline_cosmos2_5_transfer import DEFAULT_NEGATIVE_PROMPT

from distill_pl.families.cosmos_transfer.configs import COSMOS_TRANSFER_2_5_2B, COSMOS_TRANSFER_2_5_SCHEDULER
from distill_pl.families.registry import build_denoiser, denoiser_config
from distill_pl.training.dmd2 import DMD2Module
from distill_pl.training.kd import KDModule
from distill_pl.training.kd_pairs import KDPairGenerationModule, latent_shape
from tests.meta_configs import (build_on_meta, check_dmd2_recipe, check_kd_recipe, num_params, parse, wan_vae_config,
                                write_model)

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs/cosmos-transfer2.5-2b"
FOLDER = "checkpoints/Cosmos-Transfer2.5-2B"
#: text_encoder/config.json: Qwen2.5-VL-7B-Instruct (only what cosmos_text_encoder_dim reads matters)
TEXT_ENCODER_CONFIG = {
    "architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl",
    "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
    "num_key_value_heads": 4, "vocab_size": 152064, "rope_theta": 1000000.0,
    "vision_config": {"hidden_size": 1280, "out_hidden_size": 3584, "depth": 32},
}
#: scheduler/scheduler_config.json as diffusers' conversion script writes it for Cosmos 2.5
SCHEDULER_CONFIG = {"_class_name": "UniPCMultistepScheduler", **COSMOS_TRANSFER_2_5_SCHEDULER}


def write_stand_in(root: Path) -> None:
    """A Cosmos2_5_TransferPipeline folder layout with its configs and empty weight files."""
    write_model(root, "transformer", {"_class_name": "CosmosTransformer3DModel", **COSMOS_TRANSFER_2_5_2B["transformer"]})
    write_model(root, "controlnet", {"_class_name": "CosmosControlNetModel", **COSMOS_TRANSFER_2_5_2B["controlnet"]})
    write_model(root, "vae", wan_vae_config())
    (root / "scheduler").mkdir()
    (root / "scheduler/scheduler_config.json").write_text(json.dumps(SCHEDULER_CONFIG))
    (root / "text_encoder").mkdir()
    (root / "text_encoder/config.json").write_text(json.dumps(TEXT_ENCODER_CONFIG))
    (root / "model_index.json").write_text(json.dumps({
        "_class_name": "Cosmos2_5_TransferPipeline", "transformer": ["diffusers", "CosmosTransformer3DModel"],
        "controlnet": ["diffusers", "CosmosControlNetModel"], "vae": ["diffusers", "AutoencoderKLWan"],
        "scheduler": ["diffusers", "UniPCMultistepScheduler"],
        "text_encoder": ["transformers", "Qwen2_5_VLForConditionalGeneration"],
        "tokenizer": ["transformers", "Qwen2TokenizerFast"], "safety_checker": [None, None],
    }))


@pytest.fixture
def stand_in(tmp_path, monkeypatch):
    """cwd = tmp_path holding the stand-in folder; from_pretrained builds on the meta device."""
    monkeypatch.chdir(tmp_path)
    write_stand_in(tmp_path / FOLDER)

    build_on_meta(monkeypatch, (CosmosTransformer3DModel, CosmosControlNetModel, AutoencoderKLWan))
    return tmp_path / FOLDER


def in_range(net) -> bool:
    """Base ~2.4 B + ControlNet ~0.4 B parameters."""
    return 2.6e9 < num_params(net) < 3.2e9


def check_data(cli, model, mode="pairs", negative_prompt=True) -> tuple[int, ...]:
    """The data settings; ``negative_prompt``: the config sets the pipeline's (KD reads the pairs')."""
    h = cli.datamodule.hparams
    assert h.mode == mode and (h.num_frames, h.height, h.width) == (93, 704, 1280)
    assert cli.datamodule.text_dim == 100352 == model.teacher.text_dim  # 28 Qwen layers x 3584
    assert h.max_text_length == 512  # the pipeline's max_sequence_length
    if negative_prompt:
        assert h.negative_prompt == DEFAULT_NEGATIVE_PROMPT
    shape = latent_shape(model.autoencoder, (3, h.num_frames, h.height, h.width))
    assert shape == (16, 24, 88, 160)
    return shape


def test_folder_config_reads_both_models(stand_in):
    class_name, config = denoiser_config(str(stand_in))
    assert class_name == "CosmosTransformer3DModel"
    assert config["transformer"]["num_layers"] == 28 and config["controlnet"]["n_controlnet_blocks"] == 4


def test_kd_pairs_config(stand_in):
    cli = parse(CONFIGS / "kd_pairs.yaml")
    model = cli.model
    assert isinstance(model, KDPairGenerationModule)
    assert model.hparams.num_steps == 36 and model.hparams.guidance == 8.0  # Cosmos g = 7
    assert model.hparams.denoiser_options == {"control_scale": 1.0}
    teacher = model.teacher
    assert teacher.transformer.device.type == "meta" and teacher.transformer.dtype == torch.bfloat16
    assert teacher.control_channels == 16 and in_range(teacher)
    check_data(cli, model)
    data = cli.datamodule.hparams
    assert data.num_examples == 10_000 and data.shard_size % data.batch_size == 0


def test_kd_config(stand_in):
    cli = parse(CONFIGS / "kd.yaml")
    kd = cli.model
    assert isinstance(kd, KDModule)
    check_kd_recipe(cli)
    for net in (kd.teacher, kd.student):
        assert net.transformer.device.type == "meta" and in_range(net)
    assert kd.teacher.transformer.dtype == torch.bfloat16
    assert kd.student.transformer.proj_out.weight.dtype == torch.float32
    assert kd.student.transformer.gradient_checkpointing and kd.student.controlnet.gradient_checkpointing
    assert all(p.requires_grad for p in kd.student.parameters())  # base and ControlNet train together
    shape = check_data(cli, kd, negative_prompt=False)
    kd.check_pairs_metadata({"latent_shape": list(shape), "num_frames": 93, "height": 704,
                             "width": 1280, "vae_path": FOLDER, "guidance": 8.0, "num_steps": 36})


def test_dmd2_config(stand_in):
    cli = parse(CONFIGS / "dmd2.yaml", "--model.init_args.init_from=null")  # no KD checkpoint here
    dmd2 = cli.model
    assert isinstance(dmd2, DMD2Module)
    check_dmd2_recipe(cli)
    for net in (dmd2.teacher, dmd2.student, dmd2.fake_score):
        assert net.transformer.device.type == "meta" and in_range(net) and net.control_channels == 16
    assert dmd2.feature_block == 14
    check_data(cli, dmd2, mode="clips")


def test_freeze_control_branch_from_the_config(stand_in):
    cli = parse(CONFIGS / "kd.yaml", "--model.init_args.denoiser_options.freeze_control_branch=true")
    kd = cli.model
    assert not any(p.requires_grad for p in kd.student.controlnet.parameters())
    assert all(p.requires_grad for p in kd.student.transformer.parameters())
    trained = {id(p) for group in kd.configure_optimizers().param_groups for p in group["params"]}
    assert trained == {id(p) for p in kd.student.transformer.parameters()}


@pytest.mark.parametrize("name", ["kd.yaml", "dmd2.yaml"])
def test_training_configs_shard_with_fsdp2(stand_in, name):
    strategy = parse(CONFIGS / name, "--model.init_args.init_from=null" if name == "dmd2.yaml" else "--seed_everything=0")
    found = strategy.config["trainer"]["strategy"]
    assert getattr(found, "class_path", found) == "distill_pl.training.strategies.FSDP2Strategy"


#: the configs of the other ControlNets: name -> (control, control_key, data mode)
CONTROL_CONFIGS = {
    "kd_pairs_blur.yaml": ("blur", None, "pairs"),
    "kd_blur.yaml": ("blur", None, "pairs"),
    "dmd2_blur.yaml": ("blur", None, "clips"),
    "kd_pairs_depth.yaml": ("video", "depth", "pairs"),
    "kd_depth.yaml": ("video", "depth", "pairs"),
    "dmd2_depth.yaml": ("video", "depth", "clips"),
    "kd_pairs_segmentation.yaml": ("video", "segmentation", "pairs"),
    "kd_segmentation.yaml": ("video", "segmentation", "pairs"),
    "dmd2_segmentation.yaml": ("video", "segmentation", "clips"),
}


#: configs whose build repeats another's with another name only (the default suite's time)
SAME_AS_DEPTH = ("kd_pairs_segmentation.yaml", "kd_segmentation.yaml")


@pytest.mark.parametrize("name", [pytest.param(name, marks=pytest.mark.slow) if name in SAME_AS_DEPTH else name
                                  for name in sorted(CONTROL_CONFIGS)])
def test_control_configs_load_their_controlnet(stand_in, name):
    """Each ControlNet variant's config builds its networks with the ControlNet folder it names
    (here a stand-in of the edge one's config), and sets its control."""
    control, key, mode = CONTROL_CONFIGS[name]
    folder = f"checkpoints/Cosmos-Transfer2.5-2B-controlnets/{name.split('_')[-1].removesuffix('.yaml')}"
    write_model(stand_in.parent.parent, folder,
                {"_class_name": "CosmosControlNetModel", **COSMOS_TRANSFER_2_5_2B["controlnet"]})
    cli = parse(CONFIGS / name, "--model.init_args.init_from=null" if name.startswith("dmd2") else "--seed_everything=0")
    model = cli.model
    assert model.hparams.denoiser_options["controlnet_path"] == folder
    nets = [model.teacher] + [getattr(model, role) for role in ("student", "fake_score") if hasattr(model, role)]
    for net in nets:
        assert net.controlnet.device.type == "meta" and in_range(net) and net.control_channels == 16
    data = cli.datamodule.hparams
    assert (data.control, data.control_key) == (control, key)
    check_data(cli, model, mode=mode, negative_prompt=not name.startswith("kd_") or name.startswith("kd_pairs"))


def test_a_config_build_needs_no_controlnet_folder():
    """Random weights from the published configs (the memory estimate's build) take a
    controlnet_path without reading it: the ControlNet variants share one architecture."""
    net = build_denoiser("CosmosTransformer3DModel", COSMOS_TRANSFER_2_5_2B, on_meta=True,
                         controlnet_path="checkpoints/absent")
    assert net.controlnet.device.type == "meta" and in_range(net)
