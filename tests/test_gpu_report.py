"""scripts/gpu_report.sh in its tiny CPU version: one JSON and one markdown table."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # half a minute: two processes building, timing and FLOP-counting the tiny model
def test_tiny_gpu_report_writes_json_and_table(tmp_path):
    env = {**os.environ, "GPU_REPORT_TINY": "1", "PYTHON": sys.executable, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(REPO)}
    run = subprocess.run([str(REPO / "scripts" / "gpu_report.sh"), str(tmp_path)], env=env, cwd=REPO,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    report = json.loads((tmp_path / "gpu_report.json").read_text())
    phases = [p["phase"] for p in report["benchmark"]["phases"]]
    assert phases == ["kd", "dmd2_critic", "dmd2_generator"]
    assert set(report["estimated_peak_gib"]) == set(phases) and all(v > 0 for v in report["estimated_peak_gib"].values())
    sampling = report["benchmark"]["sampling"]
    assert sampling["teacher_nfe"] == 4 and sampling["teacher_s_per_video"] > sampling["student_s_per_video"] > 0
    table = (tmp_path / "gpu_report.md").read_text()
    for phase in phases:
        assert f"| {phase} |" in table
    assert "| student 1-step |" in table and "speed-up" in table
