"""Image-conditioned evaluation: the frame the model is given (the image of image-to-video) is
left out of every quality metric and measured apart (the control fidelity of ``control: clip``,
the first-frame PSNR against the image); a tiny two-expert Wan 2.2 I2V teacher (and a student
exported from it) evaluated through the CLI with the low-noise expert's own CFG weight. A
pooling stand-in replaces the frame feature network: these tests are about which frames enter."""

import json
import math
from pathlib import Path

import pytest
import torch

from distill_pl.cli.main import main
from distill_pl.data.bundled import BUNDLED_CLIPS, caption_for
from distill_pl.data.controls import ControlSettings
from distill_pl.data.manifest import ManifestEntry, write_manifest
from distill_pl.eval.control_fidelity import ControlFidelity
from distill_pl.eval import evaluate as evaluate_module
from distill_pl.eval.evaluate import score_methods
from distill_pl.eval.methods import Method
from distill_pl.eval.metric_cache import MetricCache
from distill_pl.export.model_folders import save_student_folder
from distill_pl.families.registry import load_denoiser
from distill_pl.util.paths import resolve_path
from tests.families.wan22_tiny import write_tiny_wan22

WINDOWS, SEEDS, FRAMES, SIZE = 2, 2, 4, 16
pytestmark = pytest.mark.usefixtures("one_thread")


class PooledFrames(torch.nn.Module):
    """A stand-in for the frame feature network (seconds less per call): frames [N, 3, H, W]
    -> their 4 x 4 average pools [N, 48]."""

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.adaptive_avg_pool2d(frames.float(), 4).flatten(1)


def _scores(tmp_path: Path, name: str, videos: dict, clips: dict, given_frames: int) -> dict:
    """score_methods' rows by key (fresh cache), the image control's fidelity."""
    methods = [Method(key, key, 1, None) for key in videos]
    settings = {key: {} for key in videos}
    result = score_methods(methods, videos, {key: 1.0 for key in videos}, clips,
                           lambda: clips["video"].repeat(SEEDS, 1, 1, 1, 1), SEEDS,
                           ControlFidelity(ControlSettings("clip")), 3, MetricCache(tmp_path / f"{name}.json"),
                           settings, {}, given_frames=given_frames)
    return {row["key"]: row for row in result["methods"]}


def test_a_difference_in_the_given_frame_changes_only_the_image_psnr(tmp_path, monkeypatch):
    monkeypatch.setattr(evaluate_module, "FrameFeatureNet", PooledFrames)
    g = torch.Generator().manual_seed(0)
    real = torch.rand(WINDOWS, 3, FRAMES, SIZE, SIZE, generator=g) * 2 - 1
    clips = {"video": real, "control": real}  # image-to-video: the control is the clip

    def noisy(scale: float) -> torch.Tensor:
        video = real.repeat(SEEDS, 1, 1, 1, 1)
        return (video + scale * torch.randn(video.shape, generator=g)).clamp(-1, 1)

    videos = {"teacher": noisy(0.1), "student": noisy(0.3)}
    first = _scores(tmp_path, "first", videos, clips, given_frames=1)
    changed = dict(videos, student=videos["student"].clone())
    first_frames = changed["student"][:, :, 0]
    first_frames.copy_(torch.rand(first_frames.shape, generator=g) * 2 - 1)  # only the given (first) frame differs
    second = _scores(tmp_path, "second", changed, clips, given_frames=1)

    assert second["teacher"] == first["teacher"]
    assert second["student"]["image_psnr"] < first["student"]["image_psnr"] - 3
    main_metrics = {k: v for k, v in first["student"].items() if k != "image_psnr"}
    assert {k: v for k, v in second["student"].items() if k != "image_psnr"} == main_metrics
    for key in ("psnr", "ssim", "frechet_distance", "frechet_to_teacher", "motion_frechet_distance", "diversity"):
        assert main_metrics[key] is not None and math.isfinite(main_metrics[key]), key
    # the image PSNR is the first frame's PSNR against the image and nothing else
    expected = -10 * torch.log10((videos["student"][:, :, 0] - real[:, :, 0].repeat(SEEDS, 1, 1, 1)).square()
                                 .flatten(1).mean(1) / 4)
    assert first["student"]["image_psnr"] == pytest.approx(float(expected.mean()), rel=1e-5)

    # the count of given frames is data: with none given (text-to-video), the same change moves
    # every metric that compares the first frame
    none_given = _scores(tmp_path, "none", videos, clips, given_frames=0)
    all_frames = _scores(tmp_path, "all", changed, clips, given_frames=0)
    for key in ("psnr", "ssim", "frechet_distance", "frechet_to_teacher", "motion_frechet_distance", "diversity"):
        assert all_frames["student"][key] != pytest.approx(none_given["student"][key], rel=1e-4), key
    with pytest.raises(ValueError, match="need a generated frame"):
        _scores(tmp_path, "every", videos, clips, given_frames=FRAMES)


def test_a_two_expert_image_to_video_teacher_is_evaluated_on_its_generated_frames(tmp_path, monkeypatch):
    monkeypatch.setattr(evaluate_module, "FrameFeatureNet", PooledFrames)  # the network: tests/eval/test_evaluate.py
    teacher = write_tiny_wan22(tmp_path / "teacher", "i2v-a14b")
    student = save_student_folder(tmp_path / "student", load_denoiser(str(teacher)), 3.0, teacher=teacher)
    clips = resolve_path(BUNDLED_CLIPS)
    write_manifest(tmp_path / "manifest.jsonl",
                   [ManifestEntry(clips / "carphone_pristine.mp4", caption_for(Path("carphone_pristine")))])
    main([
        "evaluate", "--teacher", str(teacher), "--vae_path", str(teacher), "--students",
        json.dumps({"Copy": str(student)}), "--out", str(tmp_path / "eval"), "--teacher_steps", "2",
        "--guidance", "2.0", "--guidance_2", "1.5", "--few_steps", "[]", "--samples_per_clip", "2",
        "--bootstrap_resamples", "2", "--batch_size", "4", "--sheet_clips", "1",
        "--data.control", "clip", "--data.manifest", str(tmp_path / "manifest.jsonl"), "--data.num_frames", "5",
        "--data.frame_stride", "2", "--data.height", "16", "--data.width", "16", "--data.val_clips_per_video", "2",
        "--data.max_text_length", "8", "--data.cache_dir", str(tmp_path / "cache"),
    ])
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert report["settings"]["given_frames"] == 1 and report["settings"]["guidance_2"] == 1.5
    assert report["settings"]["control_fidelity"]["key"] == "image_psnr"
    rows = {row["key"]: row for row in report["methods"]}
    assert list(rows) == ["teacher_2step", "student_copy"]
    assert rows["teacher_2step"]["name"] == "teacher 2-step CFG w=2 low-noise w=1.5"
    assert [row["nfe"] for row in rows.values()] == [4, 1]
    for row in rows.values():  # random experts: a finite, poor agreement with the image
        assert math.isfinite(row["image_psnr"]) and row["image_psnr"] > 0
        assert row["frechet_distance"] > 0 and row["diversity"] > 0
    table = (tmp_path / "eval" / "report.md").read_text()
    assert "first-frame PSNR vs image (dB)" in table.splitlines()[2]
    assert "Given frames: the first 1 frame(s)" in table
