"""What the real-size config tests share: stand-in diffusers folders (the published configs
and empty weight files), ``from_pretrained`` building on the meta device, and the project's
CLI parsing a config into its model and data without a Trainer."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKLWan
from safetensors.torch import save_file

from distill_pl.cli.main import DistillCLI
from distill_pl.data.datamodule import VideoDataModule


def write_model(root: Path, sub: str, config: dict) -> None:
    """``root/sub``: a model folder with ``config.json`` and a safetensors file that holds no
    tensor (a valid header: the folder passes the weights check, the model is built on meta)."""
    (root / sub).mkdir(parents=True)
    (root / sub / "config.json").write_text(json.dumps(config))
    save_file({}, str(root / sub / "diffusion_pytorch_model.safetensors"))


def wan_vae_config() -> dict:
    """The Wan 2.1 VAE's config.json: diffusers' AutoencoderKLWan defaults (z_dim 16, 4x
    temporal, 8x spatial)."""
    with torch.device("meta"):
        return {"_class_name": "AutoencoderKLWan", **dict(AutoencoderKLWan().config)}


def build_on_meta(monkeypatch, classes) -> None:
    """``cls.from_pretrained(folder, torch_dtype=...)`` of each of ``classes`` builds from the
    folder's config.json on the meta device (``_keep_in_fp32_modules`` stay float32)."""
    def on_meta(cls, folder, torch_dtype=torch.float32, **kwargs):
        config = json.loads((Path(folder) / "config.json").read_text())
        with torch.device("meta"):
            model = cls.from_config(config)
        keep = getattr(model, "_keep_in_fp32_modules", None) or []
        for name, param in model.named_parameters():
            if not any(m in name.split(".") for m in keep):
                param.data = param.data.to(torch_dtype)
        return model

    for cls in classes:
        monkeypatch.setattr(cls, "from_pretrained", classmethod(on_meta))


class ParsedCLI(DistillCLI):
    """The project's CLI, parsing and instantiating model and data only (no Trainer: the
    configs ask for 8 GPUs)."""

    def instantiate_classes(self) -> None:
        instantiate = getattr(self.parser, "instantiate", None) or self.parser.instantiate_classes
        self.config_init = instantiate(self.config)
        self.model = self.config_init["model"]
        self.datamodule = self.config_init["data"]


def parse(config: Path, *overrides: str) -> ParsedCLI:
    return ParsedCLI(model_class=None, datamodule_class=VideoDataModule, subclass_mode_model=True,
                     run=False, args=["--config", str(config), *overrides])


def num_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def global_batch(cli: ParsedCLI, per_device: int) -> int:
    """Samples per optimizer step: ``per_device`` samples on each data-parallel rank; with the
    stage's ``context_parallel`` the processes of each group share one rank's samples."""
    trainer = cli.config["trainer"]
    cp = getattr(cli.model, "context_parallel", None)
    return trainer["num_nodes"] * trainer["devices"] // (cp.size if cp is not None else 1) * per_device


def check_kd_recipe(cli: ParsedCLI) -> None:
    """The reference KD recipe: AdamW lr 1e-5, betas (0.9, 0.999), weight decay 0.01, global
    batch 64, 10k optimizer steps, gradient clipping 10, bf16 mixed precision."""
    h = cli.model.hparams
    assert (h.lr, tuple(h.betas), h.weight_decay) == (1e-5, (0.9, 0.999), 0.01)
    trainer = cli.config["trainer"]
    per_device = cli.datamodule.hparams.batch_size
    assert global_batch(cli, per_device) == 64 and per_device == h.accumulate_micro_batches  # micro-batches of 1
    assert trainer["max_steps"] == 10_000 and h.grad_clip == 10
    assert trainer.get("accumulate_grad_batches", 1) == 1 and trainer.get("gradient_clip_val") is None
    assert trainer["precision"] == "bf16-mixed"


def check_dmd2_recipe(cli: ParsedCLI) -> None:
    """The reference DMD2 recipe: lr 5e-7 for every network, w = 6 (Cosmos g = 5), GAN weight
    1e-3, 4 critic : 1 student steps, AdamW betas (0.9, 0.999), weight decay 0.01, student
    gradient clip 10, 24k steps in bf16 mixed precision, global batch 64."""
    h = cli.model.hparams
    assert (h.student_lr, h.fake_score_lr, h.discriminator_lr) == (5e-7, 5e-7, 5e-7)
    assert (h.guidance, h.gan_weight, h.student_update_freq) == (6.0, 1e-3, 5)
    assert (tuple(h.betas), h.weight_decay, h.student_grad_clip) == ((0.9, 0.999), 0.01, 10.0)
    trainer = cli.config["trainer"]
    per_device = cli.datamodule.hparams.batch_size
    assert global_batch(cli, per_device) == 64 and per_device % h.accumulate_micro_batches == 0
    assert trainer["max_steps"] == 24_000 and trainer["precision"] == "bf16-mixed"
