"""``distill-pl evaluate`` on a tiny teacher and student: every report file, consistent
rows, and a rerun that reuses the generated videos."""

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from distill_pl.cli.main import main
from distill_pl.data.bundled import BUNDLED_CLIPS, caption_for
from distill_pl.data.manifest import ManifestEntry, write_manifest
from distill_pl.eval import evaluate as evaluate_module
from distill_pl.eval.evaluate import seconds_per_video
from distill_pl.export.model_folders import save_student_folder, save_teacher_folder
from distill_pl.families.registry import build_denoiser
from distill_pl.util.paths import resolve_path

TEACHER = dict(patch_size=[1, 4, 4], num_attention_heads=2, attention_head_dim=12, in_channels=6,
               out_channels=3, text_dim=384, freq_dim=16, ffn_dim=32, num_layers=1, rope_max_seq_len=32)
VIDEOS = ("carphone_pristine", "bigbuckbunny")

pytestmark = pytest.mark.usefixtures("one_thread")


def test_seconds_per_video_is_the_median_after_the_warmup_batch():
    # batches of 4 for 10 examples: 2 full batches and a partial one; the first is warm-up
    assert seconds_per_video([9.0, 2.0, 1.0], batch_size=4, num_examples=10) == 2.0 / 4
    assert seconds_per_video([9.0, 2.0, 4.0, 3.0], batch_size=2, num_examples=8) == 3.0 / 2


def _args(tmp_path: Path, teacher: Path, students: dict) -> list[str]:
    return [
        "evaluate", "--teacher", str(teacher), "--students", json.dumps(students),
        "--out", str(tmp_path / "eval"), "--teacher_steps", "3", "--guidance", "1.0",
        "--few_steps", "[1]", "--samples_per_clip", "2", "--bootstrap_resamples", "3", "--batch_size", "4", "--sheet_clips", "3",
        "--data.manifest", str(tmp_path / "manifest.jsonl"), "--data.num_frames", "4",
        "--data.frame_stride", "2", "--data.height", "16", "--data.width", "16",
        "--data.val_clips_per_video", "2", "--data.max_text_length", "8",
        "--data.cache_dir", str(tmp_path / "cache"),
    ]


@pytest.mark.slow  # 50 s of the default suite's 596 s (2026-12-07, idle machine)
def test_report_files_rows_and_resume(tmp_path, monkeypatch):
    torch.manual_seed(0)
    videos = resolve_path(BUNDLED_CLIPS)
    write_manifest(tmp_path / "manifest.jsonl",
                   [ManifestEntry(videos / f"{v}.mp4", caption_for(Path(v))) for v in VIDEOS])
    teacher_net = build_denoiser("WanTransformer3DModel", TEACHER)
    # flow-match Euler: its one step evaluates the network at timestep 1000 (sigma = 1), as a
    # one-step student does (UniPC's first timestep is 999, which Wan's pipeline passes as it is)
    teacher = save_teacher_folder(tmp_path / "teacher", teacher_net, "euler", 1.0)
    # a "student" with the teacher's weights: its one step is the teacher's one step without CFG
    students = {"Same": str(save_student_folder(tmp_path / "same", teacher_net, 1.0)),
                "Random": str(save_student_folder(tmp_path / "random", build_denoiser("WanTransformer3DModel", TEACHER), 1.0))}
    main(_args(tmp_path, teacher, students))

    out = tmp_path / "eval"
    report = json.loads((out / "report.json").read_text())
    rows = {row["key"]: row for row in report["methods"]}
    assert list(rows) == ["teacher_3step", "teacher_1step", "student_same", "student_random"]
    assert [rows[k]["nfe"] for k in rows] == [3, 1, 1, 1]  # guidance 1: no CFG branch
    assert rows["teacher_3step"]["psnr"] is None and rows["teacher_3step"]["speedup"] == 1.0
    same, teacher_1 = rows["student_same"], rows["teacher_1step"]
    # equal up to float rounding (videos are stored as float16; a rounding can flip an edge pixel)
    for metric in ("psnr", "ssim", "frechet_distance", "diversity"):
        assert same[metric] == pytest.approx(teacher_1[metric], rel=1e-3), metric
    assert same["edge_f1"] == pytest.approx(teacher_1["edge_f1"], abs=5e-3)
    assert rows["student_random"]["psnr"] != pytest.approx(same["psnr"], rel=1e-3)
    # distance to the reference teacher's samples: 0 for the reference itself (by construction),
    # its spread that of its own resampled videos; the same for the same videos
    assert rows["teacher_3step"]["frechet_to_teacher"] == 0.0 and rows["teacher_3step"]["frechet_to_teacher_std"] > 0
    for metric in ("frechet_to_teacher", "motion_frechet_distance"):
        assert same[metric] == pytest.approx(teacher_1[metric], rel=1e-3), metric
    assert "frechet_to_extra_teacher" not in same and report["settings"]["extra_reference_guidance"] is None
    for row in rows.values():
        assert 0 <= row["edge_f1"] <= 1 and row["frechet_distance"] >= 0 and row["diversity"] > 0
        assert 0 < row["frechet_distance_std"] < row["frechet_distance"]
        assert 0 < row["motion_frechet_distance_std"] < row["motion_frechet_distance"]
        assert row["speedup_fraction_of_ceiling"] == pytest.approx(row["speedup"] / row["nfe_ratio"])
    for row in list(rows.values())[1:]:  # 8 videos: the spread can exceed a small distance
        assert row["frechet_to_teacher"] > 0 and row["frechet_to_teacher_std"] > 0
    assert rows["student_random"]["frechet_to_teacher"] > 2 * teacher_1["frechet_to_teacher"]
    assert report["real_floor"]["motion_frechet_distance"] > 0 and report["real_floor"]["motion_frechet_distance_std"] > 0
    assert report["real_floor"]["num_videos"] == 8  # 2 videos x 2 windows x 2 seeds
    assert report["settings"]["held_out_windows"] == 4 and report["machine"]["cpu_count"]

    table = (out / "report.md").read_text()
    assert "teacher 3-step" in table and "(floor)" in table and "Fréchet distance" in table
    header = table.splitlines()[2]
    for column in ("| Fréchet to real clips |", "| Fréchet to teacher w=1 |", "| motion Fréchet to real clips |"):
        assert column in header
    assert "Fréchet to extra teacher" not in header
    assert "| teacher 3-step | 3 |" in table and "| 0.0 ± " in table
    sheet = Image.open(out / "contact_sheet.png")
    # rows: control, 4 methods, real clip; 3 windows of 3 frames each
    assert sheet.height == 6 * (16 + 2) * 4 - 2 * 4
    mp4s = sorted(p.name for p in (out / "samples").glob("*.mp4"))
    assert len(mp4s) == 3 * 6 and "control_window0.mp4" in mp4s and "student_same_window2.mp4" in mp4s

    # an unchanged rerun reuses every generated video and every metric: generating, computing
    # features or any metric again would fail here
    def refuse(*args, **kwargs):
        raise AssertionError("computed again although the result was saved")

    def generate_nothing(methods, *args, **kwargs):
        assert not methods, [m.key for m in methods]
        return {}

    monkeypatch.setattr(evaluate_module, "generate_interleaved", generate_nothing)
    for name in ("FrameFeatureNet", "video_frame_features", "video_motion_features", "real_training_clips"):
        monkeypatch.setattr(evaluate_module, name, refuse)
    for name in ("psnr_per_video", "ssim_per_video", "edge_f1", "mean_pairwise_rms", "frechet_distance_to"):
        monkeypatch.setattr(evaluate_module.metrics, name, refuse)
    main(_args(tmp_path, teacher, students))
    assert json.loads((out / "report.json").read_text())["methods"] == report["methods"]

    # a changed metric setting recomputes the metrics (from the same videos), and an extra
    # teacher reference (CFG w=2) generates only its own videos and leaves the other rows alone
    monkeypatch.undo()
    generate = evaluate_module.generate_interleaved

    def generate_the_extra_reference(methods, *args, **kwargs):
        assert [m.key for m in methods] == ["teacher_3step_w2"]
        return generate(methods, *args, **kwargs)

    monkeypatch.setattr(evaluate_module, "generate_interleaved", generate_the_extra_reference)
    calls = []
    features = evaluate_module.video_frame_features
    monkeypatch.setattr(evaluate_module, "video_frame_features", lambda *a: calls.append(1) or features(*a))
    main([*_args(tmp_path, teacher, students), "--edge_tolerance", "0", "--extra_reference_guidance", "2.0"])
    rerun_report = json.loads((out / "report.json").read_text())
    rerun = {row["key"]: row for row in rerun_report["methods"]}
    assert len(calls) == 1 + 5 + 1  # the real held-out clips, 5 methods (each once), the floor
    assert list(rerun) == ["teacher_3step", "teacher_3step_w2", "teacher_1step", "student_same", "student_random"]
    extra = rerun["teacher_3step_w2"]
    assert extra["name"] == "teacher 3-step CFG w=2" and extra["nfe"] == 6
    assert extra["frechet_to_extra_teacher"] == 0.0 and extra["frechet_to_teacher"] > 0 and extra["psnr"] is not None
    for key, row in rows.items():  # the same videos: every value but the edge F1 (tolerance 0 now)
        assert {k: v for k, v in rerun[key].items() if k not in ("edge_f1", "frechet_to_extra_teacher",
                                                                 "frechet_to_extra_teacher_std")} == \
            {k: v for k, v in row.items() if k != "edge_f1"}, key
        assert rerun[key]["frechet_to_extra_teacher"] > 0 and rerun[key]["frechet_to_extra_teacher_std"] > 0
    assert rerun_report["references"]["extra_teacher"]["key"] == "teacher_3step_w2"
    header = (out / "report.md").read_text().splitlines()[2]
    assert "| Fréchet to teacher w=1 | Fréchet to extra teacher w=2 |" in header


def test_few_step_students_get_rows_with_their_exported_steps(tmp_path):
    """2- and 4-step student exports: one row each, named by its steps, NFE = steps, every
    quality column; their videos are the few-step sampler's at the exported levels."""
    torch.manual_seed(0)
    videos = resolve_path(BUNDLED_CLIPS)
    write_manifest(tmp_path / "manifest.jsonl",
                   [ManifestEntry(videos / f"{v}.mp4", caption_for(Path(v))) for v in VIDEOS])
    teacher_net = build_denoiser("WanTransformer3DModel", TEACHER)
    teacher = save_teacher_folder(tmp_path / "teacher", teacher_net, "unipc", 1.0)
    students = {"Two": str(save_student_folder(tmp_path / "two", teacher_net, 1.0, None, (1.0, 0.5))),
                "Four": str(save_student_folder(tmp_path / "four", teacher_net, 1.0, None, (1.0, 0.75, 0.5, 0.25),
                                                sampler="euler"))}
    main(_args(tmp_path, teacher, students) + ["--teacher_steps", "2", "--few_steps", "[]",
                                               "--data.val_clips_per_video", "1", "--sheet_clips", "1"])
    rows = {row["key"]: row for row in json.loads((tmp_path / "eval" / "report.json").read_text())["methods"]}
    assert list(rows) == ["teacher_2step", "student_two", "student_four"]
    assert [rows[k]["nfe"] for k in rows] == [2, 2, 4]
    assert rows["student_two"]["name"] == "Two student 2-step"
    assert rows["student_four"]["name"] == "Four student 4-step Euler"  # its student_steps.json sampler
    for key in ("student_two", "student_four"):
        row = rows[key]
        for column in ("psnr", "ssim", "edge_f1", "frechet_distance", "frechet_distance_std", "diversity",
                       "seconds_per_video", "speedup"):
            assert row[column] is not None and row[column] == row[column], (key, column)
    assert rows["student_two"]["psnr"] != pytest.approx(rows["student_four"]["psnr"], rel=1e-3)
    table = (tmp_path / "eval" / "report.md").read_text()
    assert "Two student 2-step" in table and "Four student 4-step Euler" in table


def test_the_tiny_config_adds_the_teacher_at_the_dmd2_guidance():
    import yaml

    repo = Path(__file__).resolve().parents[2]
    evaluation = yaml.safe_load((repo / "configs/tiny/eval.yaml").read_text())
    dmd2 = yaml.safe_load((repo / "configs/tiny/dmd2.yaml").read_text())
    assert evaluation["extra_reference_guidance"] == dmd2["model"]["init_args"]["guidance"] != evaluation["guidance"]
