"""The DMD2 discriminator: a small head on the hidden states of one transformer block."""

from __future__ import annotations

import math

from torch import Tensor, nn


class DiscriminatorHead(nn.Module):
    """Block features [B, D, t, h, w] -> one real/fake logit per sample [B].

    Strided Conv3d (``kernel_size``, ``stride``, padding ``kernel // 2`` so any grid, even
    1x1x1, gives at least one output position) -> GroupNorm -> LeakyReLU(0.2) -> 1x1x1
    Conv3d to one channel -> mean over the remaining grid. The features come from a
    Denoiser called with ``feature_block=k`` (the fake score network's, or the teacher's).
    Computes in the dtype of its parameters and returns float32 logits.
    """

    def __init__(
        self,
        feature_dim: int,
        hidden_dim: int = 256,
        kernel_size: tuple[int, int, int] = (3, 4, 4),
        stride: tuple[int, int, int] = (1, 2, 2),
        num_groups: int = 32,
    ) -> None:
        super().__init__()
        kernel_size, stride = tuple(kernel_size), tuple(stride)
        groups = math.gcd(num_groups, hidden_dim)
        self.conv = nn.Conv3d(
            feature_dim, hidden_dim, kernel_size, stride=stride, padding=tuple(k // 2 for k in kernel_size)
        )
        self.norm = nn.GroupNorm(groups, hidden_dim)
        self.act = nn.LeakyReLU(0.2)
        self.out = nn.Conv3d(hidden_dim, 1, kernel_size=1)

    def forward(self, features: Tensor) -> Tensor:
        if features.ndim != 5 or features.shape[1] != self.conv.in_channels:
            raise ValueError(
                f"features must be [B, {self.conv.in_channels}, t, h, w], got {list(features.shape)}"
            )
        h = features.to(self.conv.weight.dtype)
        logits = self.out(self.act(self.norm(self.conv(h))))
        return logits.float().mean(dim=(1, 2, 3, 4))
