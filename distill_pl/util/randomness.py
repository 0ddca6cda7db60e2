"""Step-keyed random numbers: training randomness that needs no saved RNG state.

Every random draw of a training step comes from a generator seeded by (seed, global_step,
stream), so a run resumed from a checkpoint at step k draws exactly what the
uninterrupted run drew at step k, without saving or restoring any RNG state.
"""

from __future__ import annotations

import numpy as np
import torch


def step_generator(seed: int, step: int, stream: int = 0, device: torch.device | str = "cpu") -> torch.Generator:
    """A torch Generator on ``device`` seeded from (seed, step, stream)."""
    key = int(np.random.SeedSequence([seed, step, stream]).generate_state(1, dtype=np.uint64)[0] >> 1)
    return torch.Generator(device=device).manual_seed(key)


def randn(shape, generator: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    """Standard normal noise of ``shape`` with the dtype/device of ``like``, drawn on the
    generator's device (CPU draws then move, so results do not depend on the accelerator)."""
    return torch.randn(shape, generator=generator, device=generator.device).to(like)
