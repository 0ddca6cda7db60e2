"""CollapseMonitor.measure without a run: its measures, and ``max_samples`` (the first rows of the batch)."""

from __future__ import annotations

import pytest
import torch

from distill_pl.callbacks.collapse import CollapseMonitor


class Samples:
    """A stand-in module: ``student_samples`` returns the batch's ``video`` rows and records their count."""

    device = torch.device("cpu")

    def __init__(self):
        self.sizes = []

    def student_samples(self, batch, seed):
        self.sizes.append(len(batch["video"]))
        return batch["video"]


def test_measures_and_max_samples():
    video = torch.zeros(4, 3, 2, 2, 2)
    video[1] = 1.0  # saturated
    video[2:] = 0.5
    batch = {"video": video, "prompt": ["a", "b", "c", "d"], "fps": 8}
    module = Samples()
    diversity, saturation = CollapseMonitor().measure(module, batch)
    assert saturation == 0.25 and diversity == pytest.approx(float(video.std(dim=0).mean()))
    diversity, saturation = CollapseMonitor(max_samples=2).measure(module, batch)
    assert module.sizes == [4, 2] and saturation == 0.5
    assert diversity == pytest.approx(float(video[:2].std(dim=0).mean()))
    with pytest.raises(ValueError, match="max_samples must be >= 2"):
        CollapseMonitor(max_samples=1)
