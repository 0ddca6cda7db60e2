"""FLOP counts for model FLOPs utilisation (MFU): counted, closed form, and GPU peaks.

Conventions (those of ``torch.utils.flop_counter.FlopCounterMode``): only matrix products
count -- linear layers, convolutions, batched matmuls and attention -- at 2 FLOPs per
multiply-add; norms, activations, softmax and optimizer updates count zero.

*Model FLOPs* are the forward and backward passes a step needs, without the forward passes
that activation checkpointing repeats in backward (and without the ``Q K^T`` that flash
attention's backward recomputes); MFU = model FLOPs / step time / the GPU's dense peak.
"""

from __future__ import annotations

import math
from typing import Callable

from torch.utils.flop_counter import FlopCounterMode

#: dense (no 2:4 sparsity) bf16 tensor-core peak, TFLOP/s, from NVIDIA's data sheets
PEAK_BF16_TFLOPS = {
    "H100 SXM": 989.0,
    "H100 NVL": 835.0,
    "H100 PCIe": 756.0,
    "H200": 989.0,
    "A100": 312.0,
}


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of the matrix products that ``fn()`` runs, backward passes included.

    Run it on the meta device to count a real-size model without memory: there
    ``scaled_dot_product_attention`` decomposes into two batched matmuls forward and four
    backward, the model-FLOP convention. (On a CPU, torch's fused attention kernel is not
    counted at all; on a GPU, the flash kernels count 2.5x forward in backward.)
    """
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def peak_bf16_tflops(device_name: str) -> tuple[float, str] | None:
    """(dense bf16 peak TFLOP/s, the data-sheet entry) for a CUDA device name such as
    ``"NVIDIA H100 80GB HBM3"``; None when the name is not in :data:`PEAK_BF16_TFLOPS`.
    An H100 that is neither PCIe nor NVL is taken to be the SXM part."""
    name = device_name.upper()
    if "H200" in name:
        key = "H200"
    elif "H100" in name:
        key = "H100 PCIe" if "PCIE" in name else "H100 NVL" if "NVL" in name else "H100 SXM"
    elif "A100" in name:
        key = "A100"
    else:
        return None
    return PEAK_BF16_TFLOPS[key], key


def wan_forward_flops(config: dict, latent_shape: tuple[int, ...], text_len: int) -> int:
    """Closed-form FLOPs of one ``WanTransformer3DModel`` forward (text to video, no image
    branch) in the counting convention above.

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
