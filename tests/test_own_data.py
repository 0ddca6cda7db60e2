"""The README's "Your own data" guide, followed on two new videos written with PyAV:
``scripts/own_data.sh MANIFEST RUN_DIR`` runs teacher -> KD pairs -> KD -> DMD2 -> evaluation
into the run folder (tiny step counts here)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from distill_pl.data.manifest import read_manifest
from tests.cli_helpers import REPO, cli_env
from tests.video_files import write_test_video

SCRIPT = REPO / "scripts" / "own_data.sh"
TINY_STEPS = dict(TEACHER_STEPS="2", PAIRS="16", KD_STEPS="2", DMD2_STEPS="5", SAMPLE_STEPS="2")


def _my_videos(folder):
    """The guide's manifest: two 120-frame videos (the minimum at the tiny settings is 115)."""
    for i, caption in enumerate(("a yellow box sliding right", "a yellow box on noise")):
        write_test_video(folder / "videos" / f"clip{i}.mp4", 120, size=64, seed=i)
    manifest = folder / "manifest.jsonl"
    manifest.write_text("".join(json.dumps({"path": f"videos/clip{i}.mp4", "caption": c}) + "\n"
                                for i, c in enumerate(("a yellow box sliding right", "a yellow box on noise"))))
    assert len(read_manifest(manifest)) == 2
    return manifest


def _run(manifest, run_dir, **env):
    environment = {**cli_env(), "PYTHON": sys.executable, **TINY_STEPS, **env}
    return subprocess.run(["bash", str(SCRIPT), str(manifest), str(run_dir)], env=environment,
                          capture_output=True, text=True, timeout=1200)


@pytest.mark.slow
def test_own_data_script_runs_every_stage_into_its_run_folder(tmp_path):
    manifest = _my_videos(tmp_path / "mine")
    run_dir = tmp_path / "runs" / "mine"
    proc = _run(manifest, run_dir)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for name in ("teacher", "kd", "dmd2"):
        assert (run_dir / name / "export/transformer/diffusion_pytorch_model.safetensors").is_file(), name
    assert len(list((run_dir / "kd_pairs/train").glob("shard_*.safetensors"))) == 1
    report = json.loads((run_dir / "eval/report.json").read_text())
    assert [row["name"] for row in report["methods"]][-2:] == ["KD student 1-step", "DMD2 student 1-step"]
    assert report["settings"]["held_out_windows"] == 2 * 4  # 2 videos x val_clips_per_video 4
    assert {p.name for p in tmp_path.iterdir()} == {"mine", "runs"}  # nothing written elsewhere
    assert not (REPO / "runs" / "mine").exists()

    again = _run(manifest, run_dir)  # a rerun skips every finished stage
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("already done") == 3


def test_own_data_script_refuses_short_videos_before_training(tmp_path):
    """The default-suite part of the guide: 40-frame videos stop the script at its first
    stage, with the minimum length in the message, and nothing is trained."""
    videos = [write_test_video(tmp_path / f"short{i}.mp4", 40, size=32, seed=i) for i in range(2)]
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("".join(json.dumps({"path": v.name, "caption": "short"}) + "\n" for v in videos))
    proc = _run(manifest, tmp_path / "run")
    assert proc.returncode == 1
    assert "each video needs at least 115 frames" in proc.stderr and "short0.mp4: 40 frames" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) <= 3, proc.stderr
    assert not (tmp_path / "run" / "teacher").exists()


def test_usage():
    proc = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, env=dict(os.environ))
    assert proc.returncode == 2 and "usage:" in proc.stderr
