"""Interleaved generation and the report's warnings about its timings."""

from __future__ import annotations

import torch

from distill_pl.data.controls import ControlSettings
from distill_pl.eval.control_fidelity import ControlFidelity
from distill_pl.eval.methods import Method
from distill_pl.eval.report import markdown_report
from distill_pl.eval.timing import generate_interleaved, timing_warnings
from distill_pl.models.autoencoder import build_autoencoder
from distill_pl.models.conditioning import Conditioning


def test_batches_of_the_methods_are_generated_in_turn():
    order = []

    def method(key: str, scale: float) -> Method:
        def sample(noise, cond, uncond):
            order.append((key, noise.shape[0]))
            return noise * scale
        return Method(key, key, 1, sample)

    noise = torch.randn(5, 3, 2, 4, 4)
    cond = Conditioning(torch.zeros(5, 2, 8), torch.ones(5, 2, dtype=torch.bool))
    made = generate_interleaved([method("a", 0.5), method("b", -0.5)], noise, cond, cond, 2, build_autoencoder(None))
    assert order == [("a", 2), ("b", 2), ("a", 2), ("b", 2), ("a", 1), ("b", 1)]
    assert torch.equal(made["a"][0], (noise * 0.5).clamp(-1, 1)) and len(made["b"][1]) == 3


def _row(key: str, speedup: float, nfe_ratio: float) -> dict:
    return dict(key=key, name=key, nfe=1, seconds_per_video=1 / speedup, speedup=speedup, nfe_ratio=nfe_ratio,
                speedup_fraction_of_ceiling=speedup / nfe_ratio, psnr=None, ssim=None, edge_f1=1.0,
                frechet_distance=1.0, frechet_distance_std=0.1, diversity=0.1)


def test_the_report_flags_a_speedup_above_its_ceiling():
    rows = [_row("teacher", 1.0, 1.0), _row("fast", 90.0, 72.0), _row("honest", 70.0, 72.0)]
    steady = {key: [9.0, 1.0, 1.01, 0.99] for key in ("teacher", "fast", "honest")}
    runs = dict.fromkeys(steady, "run 1")
    warnings = timing_warnings(rows, steady, runs, spread_limit=0.5)
    assert len(warnings) == 1 and warnings[0].startswith("fast: speed-up 90.0x exceeds its NFE ceiling 72x (125%)")

    report = dict(methods=rows, real_floor=dict(name="real", frechet_distance=1.0, frechet_distance_std=0.1),
                  warnings=warnings, machine=dict(platform="p", cpu_count=2, torch="t", torch_threads=1, date="d"),
                  settings=dict(held_out_windows=1, samples_per_clip=2, frames=[8, 32, 32], batch_size=8,
                                canny_thresholds=[0.2, 0.4], edge_tolerance_px=1, bootstrap_resamples=10,
                                timing_spread_limit=0.5, control_fidelity=ControlFidelity(ControlSettings()).describe()))
    assert "- **warning**: fast: speed-up 90.0x exceeds its NFE ceiling" in markdown_report(report)


def test_varying_timings_and_separate_runs_are_flagged():
    rows = [_row("teacher", 1.0, 1.0), _row("student", 50.0, 72.0)]
    seconds = {"teacher": [9.0, 1.0, 2.0, 1.0], "student": [1.0, 0.02, 0.02, 0.021]}
    warnings = timing_warnings(rows, seconds, {"teacher": "run 1", "student": "run 2"}, spread_limit=0.5)
    assert len(warnings) == 2
    assert warnings[0].startswith("teacher: batch times vary by up to 100% around their median (limit 50%)")
    assert warnings[1].startswith("methods were timed in different runs")
