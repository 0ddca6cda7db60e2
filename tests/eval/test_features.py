"""The frame feature network loads its ImageNet weights and sees what is in a frame."""

import decord
import torch

from distill_pl.data.bundled import BUNDLED_CLIPS
from distill_pl.eval.features import FEATURE_DIM, FrameFeatureNet, video_frame_features
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
