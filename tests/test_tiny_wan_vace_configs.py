"""configs/tiny-wan-vace through the real CLI, in latent space with the tiny VAE: KD pairs ->
KD -> DMD2 for a few steps each, on the tiny random VACE teacher of scripts/make_tiny_wan_vace.py."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from distill_pl.data.pairs import read_shard_header
from distill_pl.models.families.registry import folder_class_name, load_denoiser
from tests.cli_helpers import REPO, edited_config, run_cli

pytestmark = pytest.mark.usefixtures("one_thread")


def write_teacher(folder):
    spec = importlib.util.spec_from_file_location("make_tiny_wan_vace", REPO / "scripts/make_tiny_wan_vace.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.write_tiny_wan_vace(folder)


def small_data(cfg, **more):
    cfg["data"].update(max_text_length=8, batch_size=2, val_batch_size=2, **more)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    work = tmp_path_factory.mktemp("tiny_wan_vace")
    write_teacher(work / "runs/tiny-wan-vace/teacher")
    return work


@pytest.mark.slow
def test_pairs_kd_dmd2_through_the_cli(work):
    def pairs(cfg):
        cfg["model"]["init_args"]["num_steps"] = 2
        small_data(cfg, num_examples=4, num_val_examples=2, shard_size=2)

    run_cli(["predict", "--config", str(edited_config("configs/tiny-wan-vace/kd_pairs.yaml", work / "p.yaml", pairs))],
            cwd=work)
    meta, _ = read_shard_header(work / "runs/tiny-wan-vace/kd_pairs/train/shard_00000.safetensors")
    assert meta["latent_shape"] == [4, 3, 4, 4] and meta["vae_path"] == "runs/tiny-wan-vace/teacher"

    def kd(cfg):
        t = cfg["trainer"]
        t.update(max_steps=2, val_check_interval=2, limit_val_batches=1)
        t["callbacks"][0]["init_args"]["every_n_train_steps"] = 2
        small_data(cfg)

    run_cli(["fit", "--config", str(edited_config("configs/tiny-wan-vace/kd.yaml", work / "kd.yaml", kd))], cwd=work)
    kd_run = work / "runs/tiny-wan-vace/kd"
    assert torch.load(kd_run / "checkpoints/last.ckpt", weights_only=True)["global_step"] == 2
    assert list(kd_run.rglob("grids/step000002_*.png"))

    def dmd2(cfg):
        t = cfg["trainer"]
        t["max_steps"] = 5
        t["callbacks"][0]["init_args"]["every_n_train_steps"] = 5
        t["callbacks"][1]["init_args"]["every_n_steps"] = 5
        cfg["model"]["init_args"]["discriminator_hidden"] = 8
        small_data(cfg, samples_per_epoch=8)

    run_cli(["fit", "--config", str(edited_config("configs/tiny-wan-vace/dmd2.yaml", work / "d.yaml", dmd2))],
            cwd=work)
    dmd2_run = work / "runs/tiny-wan-vace/dmd2"
    assert torch.load(dmd2_run / "checkpoints/last.ckpt", weights_only=True)["global_step"] == 5
    for export in (kd_run / "export", dmd2_run / "export"):
        assert folder_class_name(export) == "WanVACETransformer3DModel"
        assert load_denoiser(export).control_channels == 72
