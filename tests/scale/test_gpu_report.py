"""scripts/gpu_report.sh in its tiny CPU version: one JSON and one markdown table holding both
families (Wan2.1-T2V and Cosmos-Transfer2.5 with its ControlNet) and the context-parallel run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PHASES = ["kd", "dmd2_critic", "dmd2_generator"]


@pytest.mark.slow  # about a minute: per family, building, timing and FLOP-counting the tiny model, then estimates
def test_tiny_gpu_report_writes_json_and_table(tmp_path):
    env = {**os.environ, "GPU_REPORT_TINY": "1", "PYTHON": sys.executable, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(REPO)}
    env.pop("GPU_REPORT_FAMILIES", None)
    env.pop("GPU_REPORT_CONTEXT_PARALLEL", None)
    run = subprocess.run([str(REPO / "scripts" / "gpu_report.sh"), str(tmp_path)], env=env, cwd=REPO,
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    report = json.loads((tmp_path / "gpu_report.json").read_text())
    assert list(report["families"]) == ["wan", "cosmos"]
    table = (tmp_path / "gpu_report.md").read_text()
    for name, entry in report["families"].items():
        bench = entry["benchmark"]
        assert bench["family"] == name and bench["tiny"]
        assert [p["phase"] for p in bench["phases"]] == PHASES
        assert all(p["s_per_step"] > 0 and p["model_flops"] > 0 for p in bench["phases"])
        peaks = entry["estimated_peak_gib"]
        assert set(peaks) == set(PHASES) and all(v > 0 for v in peaks.values())
        sampling = bench["sampling"]
        assert sampling["teacher_nfe"] == 8 and sampling["guidance"] == 8.0
        assert sampling["teacher_s_per_video"] > sampling["student_s_per_video"] > 0
        assert sampling["teacher_extrapolated"] and len(sampling["teacher_step_times"]) == 2
        assert f"## {bench['model']}" in table
    cosmos = report["families"]["cosmos"]
    assert cosmos["benchmark"]["adapter_options"] == {"control_scale": 1.0}
    assert cosmos["estimate_configs"]["kd"] == "configs/tiny-cosmos-transfer2.5/kd.yaml"
    assert cosmos["estimate_teacher"] == str(tmp_path / "tiny-cosmos-teacher")
    assert report["families"]["wan"]["benchmark"]["forward_flops"]["closed_form"] > 0
    assert cosmos["benchmark"]["forward_flops"]["closed_form"] is None
    for phase in PHASES:
        assert table.count(f"| {phase} |") == 2
    assert table.count("| student 1-step |") == 2 and table.count("(extrapolated)") == 2
    assert "speed-up" in table
    [cp] = report["context_parallel"]
    assert "error" not in cp and (cp["ulysses"], cp["ring"], cp["device"]) == (2, 1, "cpu")
    assert [row["phase"] for row in cp["rows"]] == ["KD step", "critic", "generator"]
    assert all(max(row["gradient_relative_error"].values()) < 1e-5 for row in cp["rows"])
    assert "## Context parallel vs one process" in table and table.count("| ulysses 2 x ring 1 |") == 3
