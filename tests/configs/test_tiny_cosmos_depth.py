"""A depth-controlled tiny Cosmos-Transfer2.5 chain through the CLI (its ``main``, in this
process: a new interpreter's imports would take longer than the runs): the configs of
configs/tiny-cosmos-transfer2.5 on a manifest whose clips name depth control videos
(``data.control: video``, ``control_key: depth``), written by the test. By default KD pairs
(which reference each clip's depth video) -> KD; in the slow set on to DMD2 (real clips and
their depth videos) -> evaluate -> the exported student's ``student.json``. Clips of 5 frames
(2 latent frames), 2 steps of everything, as the edge chain of test_tiny_cosmos_configs."""

from __future__ import annotations

import json

import pytest
import torch

from distill_pl.data.pairs import PairShardDataset, read_shard_header
from tests.cli_helpers import edited_config, evaluate_tiny_runs, fit_short_run, pipeline_export_settings
from tests.cli_helpers import run_in_process
from tests.cli_helpers import short_dmd2_trainer, short_kd_trainer
from tests.families import cosmos_tiny
from tests.video_files import write_depth_video, write_test_video

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIGS = "configs/tiny-cosmos-transfer2.5"
RUNS = "runs/tiny-cosmos-transfer2.5"
FRAMES, STRIDE = 5, 1  # 1 + 4: two latent frames; a window spans 5 source frames
VIDEO_FRAMES = 24  # >= 19, the minimum for a window in both parts (val_fraction 0.25)
CLIPS = 2


def depth_data(cfg: dict, **more) -> None:
    """A stage's data settings: the test's manifest and its depth videos, short clips."""
    cfg["data"].update(manifest="data/manifest.jsonl", control="video", control_key="depth", num_frames=FRAMES,
                       frame_stride=STRIDE, batch_size=2, val_batch_size=2, **more)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A scratch folder with the tiny teacher and a manifest of 2 clips, each naming its depth video."""
    work = tmp_path_factory.mktemp("tiny_cosmos_depth")
    cosmos_tiny.write_tiny_cosmos_transfer(work / RUNS / "teacher")
    lines = []
    for k in range(CLIPS):
        write_test_video(work / "data" / "videos" / f"clip{k}.mp4", VIDEO_FRAMES, size=64, seed=k)
        write_depth_video(work / "data" / "depth" / f"clip{k}.mp4", VIDEO_FRAMES, size=64)
        lines.append(json.dumps({"path": f"videos/clip{k}.mp4", "caption": f"a yellow square, take {k}",
                                 "controls": {"depth": f"depth/clip{k}.mp4"}}))
    (work / "data" / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    return work


@pytest.fixture(scope="module")
def kd_run(work):
    """KD pairs of the depth-controlled clips (2 teacher steps), then 2 KD steps on them."""
    def pairs(cfg):
        cfg["model"]["init_args"]["num_steps"] = 2
        depth_data(cfg, num_examples=2, num_val_examples=2, shard_size=2)

    run_in_process(["predict", "--config", str(edited_config(f"{CONFIGS}/kd_pairs.yaml", work / "p.yaml", pairs))],
                   cwd=work)

    def kd(cfg):
        short_kd_trainer(cfg["trainer"], 2)
        depth_data(cfg)

    return fit_short_run(work, f"{CONFIGS}/kd.yaml", "kd.yaml", kd, work / RUNS / "kd", steps=2,
                         runner=run_in_process)


def test_kd_pairs_reference_the_depth_videos_and_kd_trains_on_them(work, kd_run):
    train = work / RUNS / "kd_pairs/train"
    meta, _ = read_shard_header(train / "shard_00000.safetensors")
    assert (meta["control"], meta["control_key"]) == ("video", "depth")
    depth_videos = {str(work / "data" / "depth" / f"clip{k}.mp4") for k in range(CLIPS)}
    assert set(meta["control_paths"]) <= depth_videos and set(meta["control_paths"]) <= set(meta["video_sha256"])
    pair = PairShardDataset(train)[0]
    assert not torch.equal(pair["control"], pair["video"])  # the depth video's frames, not the clip's
    assert pair["control"].std(dim=0).max() < 0.05  # grey: the depth video's frames
    assert list(kd_run.rglob("grids/step000002_*.png"))
    settings = pipeline_export_settings(kd_run / "export", "Cosmos2_5_TransferPipeline", "CosmosTransformer3DModel")
    assert (settings["control"], settings["control_key"]) == ("video", "depth")
    assert settings["control_preprocessing"]["video"]["key"] == "depth"


@pytest.mark.slow  # ~60 s: DMD2 and the evaluation on top of the default test's pairs and KD
def test_dmd2_evaluate_and_export_of_the_depth_student(work, kd_run):
    def dmd2(cfg):
        short_dmd2_trainer(cfg["trainer"], 5)
        cfg["model"]["init_args"].update(discriminator_hidden=8)
        depth_data(cfg, samples_per_epoch=8)

    dmd2_run = fit_short_run(work, f"{CONFIGS}/dmd2.yaml", "d.yaml", dmd2, work / RUNS / "dmd2", steps=5,
                             runner=run_in_process)
    settings = pipeline_export_settings(dmd2_run / "export", "Cosmos2_5_TransferPipeline", "CosmosTransformer3DModel")
    assert (settings["control"], settings["control_key"]) == ("video", "depth")

    report = evaluate_tiny_runs(work, f"{CONFIGS}/eval.yaml", work / RUNS / "eval/report.json", {"control_scale": 1.0},
                                runner=run_in_process, num_frames=FRAMES, frame_stride=STRIDE,
                                manifest="data/manifest.jsonl", control="video", control_key="depth")
    fidelity = report["settings"]["control_fidelity"]
    assert (fidelity["control"], fidelity["key"]) == ("depth", "control_edge_f1")
    assert "| depth edge F1 |" in (work / RUNS / "eval/report.md").read_text()
