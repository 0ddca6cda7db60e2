"""The Wan2.1-T2V-1.3B and 14B configs: parsed by the real CLI parser and their models built on the
meta device, from a stand-in of the diffusers folder that holds the published configs and no weights."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKLWan, WanTransformer3DModel

from distill_pl.data.datamodule import VideoDataModule
from distill_pl.families.wan.configs import WAN_2_1_T2V_1_3B, WAN_2_1_T2V_14B, WAN_T2V_CLASS
from distill_pl.training.dmd2 import DMD2Module
from distill_pl.training.kd import KDModule
from distill_pl.training.kd_pairs import KDPairGenerationModule, latent_shape
from tests.meta_configs import (build_on_meta, check_dmd2_recipe, check_kd_recipe, num_params, parse, wan_vae_config,
                                write_model)

REPO = Path(__file__).resolve().parents[2]

#: transformer/config.json of Wan-AI/Wan2.1-T2V-1.3B-Diffusers and -14B-Diffusers (the Wan
#: package's published configs)
TRANSFORMER_CONFIG = {"_class_name": WAN_T2V_CLASS, **WAN_2_1_T2V_1_3B}
TRANSFORMER_CONFIG_14B = {"_class_name": WAN_T2V_CLASS, **WAN_2_1_T2V_14B}
#: scheduler/scheduler_config.json: UniPC with flow sigmas, shift 3 (480p)
SCHEDULER_CONFIG = {
    "_class_name": "UniPCMultistepScheduler", "flow_shift": 3.0, "prediction_type": "flow_prediction",
    "use_flow_sigmas": True, "solver_order": 2, "num_train_timesteps": 1000,
}
#: text_encoder/config.json: umT5-XXL encoder (only what text_encoder_dim reads matters)
TEXT_ENCODER_CONFIG = {
    "architectures": ["UMT5EncoderModel"], "model_type": "umt5", "d_model": 4096, "d_ff": 10240,
    "d_kv": 64, "num_heads": 64, "num_layers": 24, "vocab_size": 256384,
}


@dataclass(frozen=True)
class WanModel:
    """A Wan2.1 T2V size: its configs folder, the diffusers folder they name, its transformer
    config and the range its parameter count must fall in."""

    configs: Path
    folder: str
    transformer_config: dict
    num_params: tuple[float, float]


MODELS = {
    "1.3b": WanModel(REPO / "configs/wan2.1-t2v-1.3b", "checkpoints/Wan2.1-T2V-1.3B-Diffusers",
                     TRANSFORMER_CONFIG, (1.3e9, 1.5e9)),
    "14b": WanModel(REPO / "configs/wan2.1-t2v-14b", "checkpoints/Wan2.1-T2V-14B-Diffusers",
                    TRANSFORMER_CONFIG_14B, (0.97 * 14e9, 1.03 * 14e9)),
}


def write_stand_in(root: Path, transformer_config: dict) -> None:
    """A Wan2.1 diffusers folder layout with its configs and empty weight files."""
    write_model(root, "transformer", transformer_config)
    write_model(root, "vae", wan_vae_config())
    (root / "scheduler").mkdir()
    (root / "scheduler/scheduler_config.json").write_text(json.dumps(SCHEDULER_CONFIG))
    (root / "text_encoder").mkdir()
    (root / "text_encoder/config.json").write_text(json.dumps(TEXT_ENCODER_CONFIG))


@pytest.fixture(params=list(MODELS))
def wan(request, tmp_path, monkeypatch) -> WanModel:
    """cwd = tmp_path holding the model's stand-in folder; from_pretrained builds on the meta device."""
    model_size = MODELS[request.param]
    monkeypatch.chdir(tmp_path)
    write_stand_in(tmp_path / model_size.folder, model_size.transformer_config)

    build_on_meta(monkeypatch, (WanTransformer3DModel, AutoencoderKLWan))
    return model_size


def check_data(cli: ParsedCLI, kd_model, mode: str = "pairs") -> tuple[int, ...]:
    data: VideoDataModule = cli.datamodule
    h = data.hparams
    assert h.mode == mode and (h.num_frames, h.height, h.width) == (81, 480, 832)
    assert data.text_dim == 4096 == TRANSFORMER_CONFIG["text_dim"]
    assert h.max_text_length == 512
    shape = latent_shape(kd_model.autoencoder, (3, h.num_frames, h.height, h.width))
    assert shape == (16, 21, 60, 104)
    assert all(s % p == 0 for s, p in zip(shape[1:], (1, 2, 2)))
    return shape


def in_range(module: torch.nn.Module, wan: WanModel) -> bool:
    low, high = wan.num_params
    return low < num_params(module) < high


def test_kd_pairs_config(wan):
    cli = parse(wan.configs / "kd_pairs.yaml")
    model = cli.model
    assert isinstance(model, KDPairGenerationModule)
    assert model.hparams.num_steps == 36 and model.hparams.guidance == 8.0  # Cosmos g = 7
    assert model.teacher.transformer.device.type == "meta"
    assert model.teacher.control_channels == 0  # T2V: control off
    assert model.teacher.transformer.dtype == torch.bfloat16
    assert in_range(model.teacher, wan)
    assert model.autoencoder.latent_channels == 16
    check_data(cli, model)
    data = cli.datamodule.hparams
    assert data.num_examples == 10_000 and data.negative_prompt
    trainer = cli.config["trainer"]
    assert trainer["devices"] == 8 and trainer["use_distributed_sampler"] is False
    assert data.shard_size % data.batch_size == 0


def test_kd_config(wan):
    cli = parse(wan.configs / "kd.yaml")
    kd = cli.model
    assert isinstance(kd, KDModule)
    check_kd_recipe(cli)
    for net in (kd.teacher, kd.student):
        assert net.transformer.device.type == "meta"
        assert in_range(net, wan)
        assert net.control_channels == 0 and net.latent_channels == 16  # T2V: control off
    assert kd.teacher.transformer.dtype == torch.bfloat16
    assert kd.student.transformer.proj_out.weight.dtype == torch.float32
    assert kd.student.transformer.gradient_checkpointing
    assert kd.shift == 3.0
    assert kd.autoencoder.latent_channels == 16 and not kd.autoencoder.is_pixel_space
    shape = check_data(cli, kd)
    kd.check_pairs_metadata({"latent_shape": list(shape), "num_frames": 81, "height": 480,
                             "width": 832, "vae_path": wan.folder, "guidance": 8.0, "num_steps": 36})


def test_dmd2_config(wan):
    cli = parse(wan.configs / "dmd2.yaml", "--model.init_args.init_from=null")  # no KD checkpoint here
    dmd2 = cli.model
    assert isinstance(dmd2, DMD2Module)
    check_dmd2_recipe(cli)
    h = dmd2.hparams
    assert (h.t_min, h.t_max) == (0.02, 0.98)
    assert dmd2.shift == SCHEDULER_CONFIG["flow_shift"]
    for net in (dmd2.teacher, dmd2.student, dmd2.fake_score):
        assert net.transformer.device.type == "meta" and in_range(net, wan)
        assert net.control_channels == 0 and net.latent_channels == 16  # T2V: control off
    assert dmd2.teacher.transformer.dtype == torch.bfloat16
    assert dmd2.student.transformer.proj_out.weight.dtype == torch.float32
    assert dmd2.student.transformer.gradient_checkpointing and dmd2.fake_score.transformer.gradient_checkpointing
    assert dmd2.feature_block == dmd2.teacher.num_blocks // 2
    check_data(cli, dmd2, mode="clips")

    assert cli.datamodule.hparams.batch_size == h.accumulate_micro_batches  # micro-batches of 1


def parse_14b_one_node(tmp_path: Path, monkeypatch, name: str):
    """The 14B DMD2 config ``name`` parsed (its networks on meta, from a stand-in folder in
    ``tmp_path``, no KD checkpoint); checked: the DMD2 recipe, one node of 8 GPUs, FSDP2."""
    wan = MODELS["14b"]
    monkeypatch.chdir(tmp_path)
    write_stand_in(tmp_path / wan.folder, wan.transformer_config)
    build_on_meta(monkeypatch, (WanTransformer3DModel, AutoencoderKLWan))
    cli = parse(wan.configs / name, "--model.init_args.init_from=null")
    check_dmd2_recipe(cli)
    trainer = cli.config["trainer"]
    assert (trainer["num_nodes"], trainer["devices"]) == (1, 8)
    assert trainer["strategy"] == "distill_pl.training.strategies.FSDP2Strategy"
    return cli


@pytest.mark.slow  # three 14B networks on meta and peft's injection into 40 blocks: ~20 s
def test_14b_dmd2_8gpu_config(tmp_path, monkeypatch):
    """dmd2.yaml's recipe on one node of 8 GPUs: FSDP2, a LoRA fake score on the frozen bf16
    teacher weights, a full float32 student, global batch 64 as 8 micro-batches of 1 per GPU."""
    wan = MODELS["14b"]
    cli = parse_14b_one_node(tmp_path, monkeypatch, "dmd2_8gpu.yaml")
    dmd2 = cli.model
    assert dmd2.hparams.fake_score_lora_rank == 64 and dmd2.hparams.student_lora_rank is None
    trainable = [p for p in dmd2.fake_score.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    assert dmd2.fake_score.transformer.dtype == torch.bfloat16 and in_range(dmd2.teacher, wan)
    assert all(p.requires_grad and p.dtype == torch.float32 for p in dmd2.student.parameters())
    assert cli.datamodule.hparams.batch_size == dmd2.hparams.accumulate_micro_batches == 8
    check_data(cli, dmd2, mode="clips")


@pytest.mark.slow  # three 14B networks on meta: ~15 s
def test_14b_dmd2_8gpu_context_parallel_config(tmp_path, monkeypatch):
    """dmd2.yaml's recipe with its full fake score on one node of 8 GPUs: FSDP2 and Ulysses 2,
    so 4 data-parallel groups x micro-batch 1 x 16 accumulation = global batch 64."""
    wan = MODELS["14b"]
    cli = parse_14b_one_node(tmp_path, monkeypatch, "dmd2_8gpu_cp.yaml")
    dmd2 = cli.model
    assert (dmd2.context_parallel.ulysses, dmd2.context_parallel.ring) == (2, 1)
    assert dmd2.hparams.fake_score_lora_rank is None and dmd2.hparams.student_lora_rank is None
    for net in (dmd2.student, dmd2.fake_score):
        assert all(p.requires_grad and p.dtype == torch.float32 for p in net.parameters()) and in_range(net, wan)
    assert dmd2.teacher.transformer.dtype == torch.bfloat16 and in_range(dmd2.teacher, wan)
    assert dmd2.student.transformer.gradient_checkpointing and dmd2.fake_score.transformer.gradient_checkpointing
    assert cli.datamodule.hparams.batch_size == dmd2.hparams.accumulate_micro_batches == 16
    check_data(cli, dmd2, mode="clips")
