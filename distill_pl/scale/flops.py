"""FLOP counts for model FLOPs utilisation (MFU): counted, and GPU peaks. A family's closed form
lives in its package (Wan: :func:`distill_pl.families.wan.flops.wan_forward_flops`).

Conventions (those of ``torch.utils.flop_counter.FlopCounterMode``): only matrix products
count -- linear layers, convolutions, batched matmuls and attention -- at 2 FLOPs per
multiply-add; norms, activations, softmax and optimizer updates count zero.

*Model FLOPs* are the forward and backward passes a step needs, without the forward passes
that activation checkpointing repeats in backward (and without the ``Q K^T`` that flash
attention's backward recomputes); MFU = model FLOPs / step time / the GPU's dense peak.
"""

from __future__ import annotations

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

