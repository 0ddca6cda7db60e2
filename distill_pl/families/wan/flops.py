"""Closed-form FLOPs of a Wan transformer forward, to check the counted FLOPs
(:func:`distill_pl.scale.flops.count_flops`) and for MFU without counting."""

from __future__ import annotations

import math


def wan_forward_flops(config: dict, latent_shape: tuple[int, ...], text_len: int) -> int:
    """Closed-form FLOPs of one ``WanTransformer3DModel`` forward (text to video, no image
    branch) in the counting convention of :mod:`distill_pl.scale.flops`
    (matrix products only, 2 FLOPs per multiply-add).

    config: the transformer's config (``num_attention_heads``, ``attention_head_dim``,
    ``ffn_dim``, ``num_layers``, ``in_channels``, ``out_channels``, ``patch_size``,
    ``text_dim``, ``freq_dim``); latent_shape: the input [B, C, T, H, W] (C = ``in_channels``);
    text_len: L, the text tokens. With D = heads x head_dim, F = ffn_dim, P = patch volume and
    N = T H W / P tokens per video, per video:

    - patch embedding (Conv3d, kernel = stride = patch): ``2 N (C P) D``;
    - condition embedder: time MLP ``2 (freq_dim D + D^2)``, its 6-way modulation projection
      ``2 D (6 D)``, text MLP ``2 L (text_dim D + D^2)``;
    - per block: self-attention projections q, k, v, out ``8 N D^2`` and scores plus
      weighted sum ``4 N^2 D``; cross-attention q and out ``4 N D^2``, k and v on the text
      ``4 L D^2``, scores plus sum ``4 N L D``; feed-forward ``4 N D F``;
    - output projection: ``2 N D (out_channels P)``;

    all times B.
    """
    batch, channels, frames, height, width = latent_shape
    patch = math.prod(config["patch_size"])
    d = config["num_attention_heads"] * config["attention_head_dim"]
    n = frames * height * width // patch
    length = text_len
    embed = 2 * n * channels * patch * d
    condition = (
        2 * (config["freq_dim"] * d + d * d) + 2 * d * 6 * d + 2 * length * (config["text_dim"] * d + d * d)
    )
    self_attention = 8 * n * d * d + 4 * n * n * d
    cross_attention = 4 * n * d * d + 4 * length * d * d + 4 * n * length * d
    feed_forward = 4 * n * d * config["ffn_dim"]
    block = self_attention + cross_attention + feed_forward
    head = 2 * n * d * config["out_channels"] * patch
    return batch * (embed + condition + config["num_layers"] * block + head)
