"""scripts/benchmark_wan.py on the CPU with the tiny model, and the FLOP counts it reports
against closed forms derived from the layer shapes."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from distill_pl.flops import count_flops, peak_bf16_tflops, wan_forward_flops
from distill_pl.models.conditioning import Conditioning
from distill_pl.models.denoiser import Denoiser
from distill_pl.models.families.registry import build_denoiser
from tests.test_wan_configs import TRANSFORMER_CONFIG

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "benchmark_wan.py"
_spec = importlib.util.spec_from_file_location("benchmark_wan", SCRIPT)
benchmark_wan = importlib.util.module_from_spec(_spec)
sys.modules["benchmark_wan"] = benchmark_wan  # dataclasses look their module up
_spec.loader.exec_module(benchmark_wan)


def test_tiny_cpu_run_reports_every_phase(tmp_path, capsys, one_thread):
    out = tmp_path / "bench.json"
    benchmark_wan.main(
        ["--device", "cpu", "--tiny", "--warmup", "1", "--steps", "2", "--peak_tflops", "1", "--json", str(out)]
    )
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert [p["phase"] for p in report["phases"]] == list(benchmark_wan.PHASES)
    for p in report["phases"]:
        assert p["phase"] in printed
        assert len(p["times"]) == 2 and all(t > 0 for t in p["times"]) and p["s_per_step"] > 0
        assert p["model_flops"] > 0 and p["recompute_flops"] > 0  # checkpointing is on
        assert p["mfu"] == pytest.approx(p["model_flops"] / 1e12 / p["s_per_step"] / 1.0)
        assert (p["frames"], p["latent"], p["tokens_per_video"]) == (17, [1, 16, 5, 32, 32], 5 * 16 * 16)
    kd, critic, generator = report["phases"]
    forward = report["forward_flops"]["counted"]
    assert forward == pytest.approx(report["forward_flops"]["closed_form"], rel=0.01)
    # KD: forward + backward to the weights (2x); its blocks are recomputed once
    assert kd["model_flops"] == pytest.approx(3 * forward, rel=0.02)
    assert kd["recompute_flops"] < forward
    # the critic runs the fake score on 2B with backward, the generator the teacher on 2B
    assert critic["model_flops"] > 7 * forward and generator["model_flops"] > 6 * forward
    assert "s/step" in printed and "MFU" in printed and "TFLOP/s" in printed


def test_out_of_memory_retries_with_fewer_frames(monkeypatch, capsys, one_thread):
    real = benchmark_wan.measure_phase

    def fails_above_one_latent_frame(phase, nets, optimizer, inputs, *args):
        if inputs.eps.shape[2] > 1:
            raise torch.OutOfMemoryError("simulated")
        return real(phase, nets, optimizer, inputs, *args)

    monkeypatch.setattr(benchmark_wan, "measure_phase", fails_above_one_latent_frame)
    report = benchmark_wan.main(["--device", "cpu", "--tiny", "--phases", "kd", "--warmup", "0", "--steps", "1"])
    assert "kd: out of memory at 17 frames 256x256, retrying smaller" in capsys.readouterr().out
    (kd,) = report["phases"]
    assert (kd["frames"], kd["latent"]) == (1, [1, 16, 1, 32, 32])


def _forward_flops_from_layers(model: Denoiser, latent: tuple[int, ...], text_len: int) -> int:
    """2 x weights x rows of every Linear/Conv3d, rows = the tokens it acts on (video tokens,
    text tokens, or one per sample for the time embedding), plus attention's two matmuls
    per block: ``4 N^2 D`` (self) and ``4 N L D`` (cross)."""
    b, n = latent[0], latent[2] * latent[3] * latent[4] // 4
    d = model.feature_dim
    total = 0
    for name, module in model.transformer.named_modules():
        if isinstance(module, nn.Conv3d):
            total += 2 * n * module.weight.numel()
        elif isinstance(module, nn.Linear):
            if "text_embedder" in name or name.endswith(("attn2.to_k", "attn2.to_v")):
                rows = text_len
            elif "condition_embedder" in name:
                rows = 1
            else:
                rows = n
            total += 2 * rows * module.weight.numel()
    total += model.num_blocks * (4 * n * n * d + 4 * n * text_len * d)
    return b * total


@pytest.mark.parametrize(
    "config, latent, text_len",
    [
        (benchmark_wan.TINY_CONFIG, (1, 16, 5, 32, 32), 8),
        (benchmark_wan.TINY_CONFIG, (2, 16, 3, 16, 48), 13),
        (benchmark_wan.WAN_1_3B_CONFIG, (1, 16, 21, 60, 104), 512),  # 81 frames 480x832
    ],
    ids=["tiny", "tiny-batch2", "wan1.3b-81x480x832"],
)
def test_forward_flops_match_closed_forms(config, latent, text_len):
    """FlopCounterMode on the meta device (no memory, so the real size is cheap) against
    :func:`wan_forward_flops` and against a sum over the model's own layer shapes."""
    with torch.device("meta"):
        model = build_denoiser("WanTransformer3DModel", config, dtype="bfloat16")
        x, sigma = torch.randn(latent), torch.rand(latent[0])
        cond = Conditioning(torch.randn(latent[0], text_len, config["text_dim"]))
    with torch.no_grad():
        counted = count_flops(lambda: model(x, sigma, cond))
    closed = wan_forward_flops(config, latent, text_len)
    assert counted == pytest.approx(closed, rel=0.01)
    assert counted == pytest.approx(_forward_flops_from_layers(model, latent, text_len), rel=0.01)


def test_script_config_is_the_published_one():
    published = {k: v for k, v in TRANSFORMER_CONFIG.items() if k != "_class_name"}
    assert benchmark_wan.WAN_1_3B_CONFIG == published
    latent = benchmark_wan.latent_shape(1, 16, 81, 480, 832)
    assert latent == (1, 16, 21, 60, 104)
    assert benchmark_wan.tokens_per_video(published, latent) == 32_760
    assert benchmark_wan.smaller_frames(81) == [81, 65, 49, 33, 17, 1]


@pytest.mark.parametrize(
    "name, peak",
    [
        ("NVIDIA H100 80GB HBM3", 989.0),
        ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA H200", 989.0),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("Tesla T4", None),
    ],
)
def test_peak_by_device_name(name, peak):
    found = peak_bf16_tflops(name)
    assert (found and found[0]) == peak
