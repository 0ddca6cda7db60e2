"""The blur control (distill_pl/data/blur_control.py) against closed forms, and the
``control`` setting that picks it."""

from __future__ import annotations

import math

import pytest
import torch

from distill_pl.data.blur_control import bilateral_filter, blur_control
from distill_pl.data.controls import ControlSettings
from distill_pl.export.student_settings import control_preprocessing


def test_a_constant_video_stays_constant():
    video = torch.full((3, 4, 32, 32), 0.3)
    control = blur_control(video)
    assert control.shape == video.shape and control.dtype == video.dtype
    assert (control - 0.3).abs().max() < 1e-5
    assert torch.equal(blur_control(video[None])[0], control)


def step_frame() -> torch.Tensor:
    """[1, 3, 5, 5] pixels: 0 in columns 0..2, 255 in columns 3..4."""
    frame = torch.zeros(1, 3, 5, 5)
    frame[..., 3:] = 255.0
    return frame


def test_bilateral_filter_of_a_step_edge_matches_the_hand_computed_value():
    # diameter 3: the round window of radius 1 is the pixel and its 4 neighbours; with an
    # infinite colour sigma only the space weights exp(-1 / (2 s^2)) remain. At (2, 2) the
    # right neighbour is 255 and the others 0: 255 e / (1 + 4 e).
    s = 1.5
    e = math.exp(-1 / (2 * s * s))
    out = bilateral_filter(step_frame(), 3, sigma_color=1e12, sigma_space=s)
    assert out[0, :, 2, 2] == pytest.approx([255 * e / (1 + 4 * e)] * 3, rel=1e-5)
    # a colour sigma far below the step keeps the edge exactly (the other side weighs 0)
    assert torch.allclose(bilateral_filter(step_frame(), 3, sigma_color=1.0, sigma_space=s), step_frame(), atol=1e-4)


def test_blur_control_smooths_a_step_into_the_value_range():
    video = -torch.ones(3, 2, 32, 32)
    video[..., 16:] = 1
    control = blur_control(video)
    assert control.min() >= -1 and control.max() <= 1
    assert control[..., 0].mean() < control[..., 16].mean() < control[..., -1].mean()  # monotone across the step
    assert (control[..., 15] - control[..., 16]).abs().max() < 1  # no longer a jump of 2


def test_control_settings_pick_the_control_and_refuse_bad_values():
    video = torch.rand(3, 2, 32, 32) * 2 - 1
    assert torch.equal(ControlSettings("blur").compute(video), blur_control(video))
    assert ControlSettings().metadata() == {} and ControlSettings("blur").metadata()["control"] == "blur"
    with pytest.raises(ValueError, match="unknown data.control 'depth'"):
        ControlSettings("depth")
    with pytest.raises(ValueError, match="control_key"):
        ControlSettings("video")
    with pytest.raises(ValueError, match="control_key"):
        ControlSettings("edge", control_key="depth")


def test_student_json_records_the_blur_recipe():
    hparams = dict(num_frames=5, frame_stride=4, height=32, width=32, canny_low=0.2, canny_high=0.4)
    recipe = control_preprocessing({**hparams, "control": "blur"})
    assert recipe["blur"]["bilateral"]["diameter"] == 30 and "canny" not in recipe
    assert "canny" in control_preprocessing(hparams)  # a run without the setting is an edge run
    video = control_preprocessing({**hparams, "control": "video", "control_key": "depth"})
    assert video["video"]["key"] == "depth"
