"""scripts/benchmark_family.py on the CPU with the tiny models of both families, and the FLOP
counts it reports against closed forms derived from the layer shapes (Wan)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from distill_pl.families.wan.configs import WAN_2_1_T2V_1_3B
from distill_pl.families.wan.flops import wan_forward_flops
from distill_pl.scale.flops import count_flops, peak_bf16_tflops
from distill_pl.models.conditioning import Conditioning
from distill_pl.models.denoiser import Denoiser
from distill_pl.families.registry import build_denoiser

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "benchmark_family.py"
_spec = importlib.util.spec_from_file_location("benchmark_family", SCRIPT)
benchmark = importlib.util.module_from_spec(_spec)
sys.modules["benchmark_family"] = benchmark  # dataclasses look their module up
_spec.loader.exec_module(benchmark)


def test_tiny_cpu_run_reports_every_phase(tmp_path, capsys, one_thread):
    out = tmp_path / "bench.json"
    benchmark.main(
        ["--device", "cpu", "--tiny", "--warmup", "1", "--steps", "2", "--peak_tflops", "1", "--json", str(out)]
    )
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert [p["phase"] for p in report["phases"]] == list(benchmark.PHASES)
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


@pytest.mark.slow  # inductor compiles the tiny blocks: about a minute on 2 cores
def test_compile_times_the_phase_again_compiled_and_prints_the_ratio(capsys, one_thread):
    report = benchmark.main(["--device", "cpu", "--tiny", "--phases", "dmd2_generator", "--warmup", "1", "--steps", "1",
                             "--peak_tflops", "1", "--compile"])
    [row] = report["phases"]
    assert row["compiled_s_per_step"] > 0
    assert row["compile_speedup"] == pytest.approx(row["s_per_step"] / row["compiled_s_per_step"])
    printed = capsys.readouterr().out
    assert "eager/compiled" in printed and f"{row['compile_speedup']:.2f}x" in printed
    with pytest.raises(SystemExit):  # the blocks compile in the warm-up steps
        benchmark.parse_args(["--compile", "--warmup", "0"])


@pytest.mark.slow  # 16 s (2026-12-07)
def test_tiny_cosmos_with_controlnet_and_extrapolated_teacher(tmp_path, one_thread):
    """Cosmos through the registry: the student carries its ControlNet and the conditioning
    control latents; the teacher's s/video is sample_steps x the median of the timed steps."""
    report = benchmark.main(
        ["--family", "cosmos", "--device", "cpu", "--tiny", "--warmup", "1", "--warmup_frames", "1",
         "--steps", "1", "--peak_tflops", "1", "--sampling", "--sample_steps", "4", "--teacher_timed_steps", "2"]
    )
    assert report["family"] == "cosmos" and report["adapter_options"] == {"control_scale": 1.0}
    tiny = benchmark.TINY_COSMOS_CONFIG
    base = sum(p.numel() for p in build_denoiser("CosmosTransformer3DModel", tiny).transformer.parameters())
    assert report["params_per_network"] > base  # base + ControlNet
    assert [p["phase"] for p in report["phases"]] == list(benchmark.PHASES)
    for p in report["phases"]:
        assert (p["frames"], p["latent"], p["tokens_per_video"]) == (9, [1, 16, 3, 8, 8], 3 * 4 * 4)
        assert p["model_flops"] > 0 and p["recompute_flops"] > 0 and len(p["times"]) == 1
    assert report["forward_flops"]["closed_form"] is None and report["forward_flops"]["counted"] > 0
    s = report["sampling"]
    assert s["scheduler"] == "UniPCMultistepScheduler" and s["guidance"] == 8.0 and s["teacher_nfe"] == 8
    assert len(s["teacher_step_times"]) == 2 and s["teacher_extrapolated"]
    assert s["teacher_s_per_video"] == pytest.approx(4 * sum(s["teacher_step_times"]) / 2)  # 4 x median of 2
    assert s["teacher_s_per_video_from"] == "4 x median of 2 steps after 1 warm-up"


def test_tiny_wan_times_the_whole_teacher_video(one_thread):
    report = benchmark.main(["--device", "cpu", "--tiny", "--phases", "kd", "--warmup", "0", "--steps", "1",
                             "--frames", "5", "--height", "64", "--width", "64", "--sampling", "--sample_steps", "2"])
    s = report["sampling"]
    assert not s["teacher_extrapolated"] and s["teacher_step_times"] is None and s["teacher_nfe"] == 4
    assert s["teacher_s_per_video"] > s["student_s_per_video"] > 0


def test_time_sampler_steps_stops_after_the_timed_steps():
    seen = []

    def run(on_step):
        for i in range(10):
            on_step(i, 1.0 - i / 10, None)
            seen.append(i)

    times = benchmark.time_sampler_steps(run, warmup=2, timed=3, device=torch.device("cpu"))
    assert len(times) == 3 and all(t >= 0 for t in times)
    assert seen == [0, 1, 2, 3, 4]  # stopped before step 5 ran
    with pytest.raises(ValueError, match="fewer than 11 steps"):
        benchmark.time_sampler_steps(run, warmup=2, timed=8, device=torch.device("cpu"))


@pytest.mark.parametrize("name", sorted(benchmark.FAMILIES))
def test_family_constants_are_the_configs(name):
    """Sizes, guidance and teacher steps of each family are those of its kd_pairs / kd / dmd2 configs."""
    family = benchmark.FAMILIES[name]
    cfg = {stage: yaml.safe_load((REPO / path).read_text()) for stage, path in family.configs.items()}
    for stage in ("kd_pairs", "kd", "dmd2"):
        data = cfg[stage]["data"]
        assert (data["num_frames"], data["height"], data["width"], data["max_text_length"]) == (
            family.size["frames"], family.size["height"], family.size["width"], family.size["text_len"])
    pairs, dmd2 = cfg["kd_pairs"]["model"]["init_args"], cfg["dmd2"]["model"]["init_args"]
    assert (pairs["guidance"], pairs["num_steps"]) == (family.sample_guidance, family.sample_steps)
    assert dmd2["guidance"] == family.dmd2_guidance and dmd2["gan_weight"] == benchmark.GAN_WEIGHT
    layers = family.config.get("num_layers") or family.config["transformer"]["num_layers"]
    assert dmd2["feature_block"] == layers // 2  # DMD2Roles' feature block, method_settings' None
    assert (pairs.get("denoiser_options") or {}) == family.adapter_options


def test_cosmos_2b_size():
    latent = benchmark.latent_shape(1, 16, 93, 704, 1280)
    assert latent == (1, 16, 24, 88, 160)
    assert benchmark.tokens_per_video((1, 2, 2), latent) == 84_480
    assert benchmark.smaller_frames(93) == [93, 77, 61, 45, 29, 13, 1]


def test_out_of_memory_retries_with_fewer_frames(monkeypatch, capsys, one_thread):
    real = benchmark.measure_phase

    def fails_above_one_latent_frame(phase, roles, settings, optimizer, inputs, *args):
        if inputs.eps.shape[2] > 1:
            raise torch.OutOfMemoryError("simulated")
        return real(phase, roles, settings, optimizer, inputs, *args)

    monkeypatch.setattr(benchmark, "measure_phase", fails_above_one_latent_frame)
    report = benchmark.main(["--device", "cpu", "--tiny", "--phases", "kd", "--warmup", "0", "--steps", "1"])
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
        (benchmark.TINY_CONFIG, (1, 16, 5, 32, 32), 8),
        (benchmark.TINY_CONFIG, (2, 16, 3, 16, 48), 13),
        (WAN_2_1_T2V_1_3B, (1, 16, 21, 60, 104), 512),  # 81 frames 480x832
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
    published = WAN_2_1_T2V_1_3B
    assert benchmark.FAMILIES["wan"].config is published
    latent = benchmark.latent_shape(1, 16, 81, 480, 832)
    assert latent == (1, 16, 21, 60, 104)
    assert benchmark.tokens_per_video(published["patch_size"], latent) == 32_760
    assert benchmark.smaller_frames(81) == [81, 65, 49, 33, 17, 1]


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
