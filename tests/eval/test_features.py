"""The frame feature network loads its ImageNet weights and sees what is in a frame; on frame
differences it sees motion."""

import decord
import pytest
import torch

from distill_pl.data.bundled import BUNDLED_CLIPS
from distill_pl.eval import metrics
from distill_pl.eval.features import FEATURE_DIM, FrameFeatureNet, motion_frames, video_frame_features, video_motion_features
from distill_pl.util.paths import resolve_path

BOW_TIE = 457  # ImageNet class of the carphone man's bow tie


def test_imagenet_weights_recognise_the_bow_tie():
    reader = decord.VideoReader(str(resolve_path(BUNDLED_CLIPS) / "carphone_pristine.mp4"))
    frame = torch.from_numpy(reader[60].asnumpy()).permute(2, 0, 1).float() / 127.5 - 1
    net = FrameFeatureNet()
    probabilities = net.classify(frame[None]).softmax(-1)[0]
    assert probabilities.argmax() == BOW_TIE and probabilities[BOW_TIE] > 0.3  # of 1000 classes


def test_video_features_are_per_frame_and_deterministic():
    net = FrameFeatureNet().train()  # train() must not switch batch norm to batch statistics
    videos = torch.rand(2, 3, 3, 32, 32) * 2 - 1
    features = video_frame_features(net, videos)
    assert features.shape == (6, FEATURE_DIM)
    single = video_frame_features(net, videos[1:2, :, 2:3])
    torch.testing.assert_close(single[0], features[5], atol=1e-4, rtol=1e-4)


def _pans(seed: int, videos: int = 4, frames: int = 4, size: int = 32, step: int = 4) -> torch.Tensor:
    """Videos [B, 3, T, H, W] in [-1, 1]: a smooth random texture panned by ``step`` px a frame."""
    g = torch.Generator().manual_seed(seed)
    wide = torch.rand(videos, 3, size // 4, (size + step * frames) // 4, generator=g) * 2 - 1
    wide = torch.nn.functional.interpolate(wide, scale_factor=4, mode="bilinear", align_corners=False)
    return torch.stack([wide[..., step * t: step * t + size] for t in range(frames)], dim=2)


def test_motion_frechet_is_zero_for_identical_videos_and_sees_a_frozen_video():
    """The motion measure (Fréchet distance on the features of frame differences): 0 for the
    same videos (up to float rounding), and a frozen copy of moving videos lies far from
    moving ones, where the single-frame distance barely tells them apart."""
    net = FrameFeatureNet()
    real, moving = _pans(0), _pans(1)
    frozen = moving[:, :, :1].expand_as(moving).clone()
    assert motion_frames(real).shape == (4, 3, 3, 32, 32)
    assert motion_frames(frozen).abs().max() == 0  # no change: all zeros (mid grey)
    assert motion_frames(torch.stack([-torch.ones(1, 3, 8, 8), torch.ones(1, 3, 8, 8)], 2)).min() == 1  # [-2, 2] -> [-1, 1]

    frames = {name: video_frame_features(net, v).reshape(4, 4, -1) for name, v in (("real", real), ("moving", moving))}
    frames["frozen"] = frames["moving"][:, :1].expand(-1, 4, -1)  # each frozen video: its moving one's first frame
    frames = {name: f.flatten(0, 1) for name, f in frames.items()}
    motion = {name: video_motion_features(net, v) for name, v in (("real", real), ("moving", moving), ("frozen", frozen))}
    assert motion["real"].shape == (4 * 3, FEATURE_DIM)
    torch.testing.assert_close(motion["frozen"], motion["frozen"][:1].expand(12, -1))  # one grey frame's features

    def distance(features, name):
        return metrics.frechet_distance_to(features[name], metrics.gaussian_statistics(features["real"]))

    assert distance(motion, "real") == pytest.approx(0.0, abs=1e-9 * float(motion["real"].var(0).sum()))
    assert distance(motion, "frozen") > 4 * distance(motion, "moving") > 0
    # single frames: the frozen videos look about as real as the moving ones
    assert distance(frames, "frozen") < 2 * distance(frames, "moving")
