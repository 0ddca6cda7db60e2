"""Control fidelity per modality: edge F1 (edge), the PSNR of the blurred video against the
blur control (blur), the edge F1 of the canny edges of video and control video (control
videos such as depth); each in the report's table under its own title."""

from __future__ import annotations

import math

import pytest
import torch

from distill_pl.data.blur_control import blur_control
from distill_pl.data.control import canny_control
from distill_pl.data.controls import ControlSettings
from distill_pl.eval import metrics
from distill_pl.eval.control_fidelity import ControlFidelity
from distill_pl.eval.report import markdown_table


def square_video(left: int, grey: float = 0.8, background: float = -0.6, frames: int = 2, size: int = 24):
    """[1, 3, T, size, size]: a square of ``grey`` at column ``left`` on a flat ``background``."""
    video = torch.full((1, 3, frames, size, size), background)
    video[..., 6:14, left:left + 8] = grey
    return video


def test_edge_fidelity_is_the_f1_of_the_video_edges_against_the_control():
    fidelity = ControlFidelity(ControlSettings("edge"), tolerance=1)
    video = square_video(4)
    control = canny_control(video, 0.2, 0.4)
    assert fidelity.key == "edge_f1" and fidelity.measure(video, control).item() == 1.0
    moved = square_video(14)
    expected = metrics.edge_f1(canny_control(moved, 0.2, 0.4)[:, 0] > 0, control[:, 0] > 0, 1)
    assert fidelity.measure(moved, control).item() == pytest.approx(expected.item())
    assert expected.item() < 0.5


def test_blur_fidelity_is_the_psnr_of_the_blurred_video_against_the_blur_control():
    fidelity = ControlFidelity(ControlSettings("blur"))
    video = square_video(4)
    control = blur_control(video)
    assert fidelity.key == "blur_psnr" and math.isinf(fidelity.measure(video, control).item())
    g = torch.Generator().manual_seed(0)
    noisy = video + 0.05 * torch.randn(video.shape, generator=g)
    noisier = video + 0.5 * torch.randn(video.shape, generator=g)
    near, far = fidelity.measure(noisy, control).item(), fidelity.measure(noisier, control).item()
    assert near == pytest.approx(metrics.psnr_per_video(blur_control(noisy), control).item())
    assert math.isfinite(near) and near > far + 5  # the blur hides fine noise, not all of it
    assert fidelity.measure(square_video(14), control).item() < near


def test_a_control_video_is_compared_through_the_canny_edges_of_both():
    """A depth control: the square nearer (brighter) than a darker background. A video with
    the square where the depth map has it, in other colours, matches its structure fully; a
    video with the square elsewhere does not."""
    fidelity = ControlFidelity(ControlSettings("video", control_key="depth"), tolerance=1)
    depth = square_video(4, grey=0.9, background=-0.9)
    assert fidelity.key == "control_edge_f1"
    assert fidelity.measure(square_video(4, grey=-0.2, background=0.6), depth).item() == 1.0
    assert fidelity.measure(square_video(14, grey=-0.2, background=0.6), depth).item() < 0.5
    described = fidelity.describe()
    assert (described["control"], described["title"]) == ("depth", "depth edge F1")
    assert "structure proxy (no depth model is run on the video)" in described["definition"]


@pytest.mark.parametrize("settings, title, shown", [
    (ControlSettings("edge"), "edge F1", "0.500"),
    (ControlSettings("blur"), "blur PSNR (dB)", "0.50"),
    (ControlSettings("video", control_key="segmentation"), "segmentation edge F1", "0.500"),
])
def test_the_report_table_names_the_measure_of_its_control(settings, title, shown):
    fidelity = ControlFidelity(settings)
    row = dict(name="student", nfe=1, seconds_per_video=1.0, speedup=2.0, nfe_ratio=2.0,
               speedup_fraction_of_ceiling=1.0, psnr=None, ssim=None, frechet_distance=1.0, diversity=0.1,
               **{fidelity.key: 0.5})
    report = dict(methods=[row], real_floor=dict(name="real", frechet_distance=1.0),
                  settings=dict(control_fidelity=fidelity.describe()))
    header, _, line, _ = markdown_table(report).splitlines()
    assert f"| SSIM vs ref | {title} | Fréchet" in header and f"| - | - | {shown} | 1.0" in line
