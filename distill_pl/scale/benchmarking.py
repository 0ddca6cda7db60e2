"""Timing helpers of the benchmark scripts (``scripts/benchmark*.py``)."""

from __future__ import annotations

import resource
import statistics
import sys
import time
from pathlib import Path

import lightning as L
import torch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_time(fn, repeats: int, device: torch.device) -> float:
    """Median wall seconds of ``fn()`` over ``repeats`` calls, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process so far, MiB: CUDA memory allocated by torch on a GPU,
    the peak resident set size of the whole process (Python, torch, data) on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**20 if sys.platform == "darwin" else 2**10)


def step_kind(module, step: int) -> str:
    """DMD2's ``"critic"`` or ``"student"`` step; ``"step"`` for any other stage."""
    if hasattr(module, "is_generator_phase"):
        return "student" if module.is_generator_phase(step) else "critic"
    return "step"


def missing_init_from_override(config: str) -> tuple[tuple[str, ...], str]:
    """(extra CLI args, note): a config whose ``model.init_args.init_from`` does not exist
    yet is benchmarked from the teacher's weights instead (same networks, same cost)."""
    import yaml

    from distill_pl.util.paths import resolve_path

    init_from = yaml.safe_load(Path(config).read_text())["model"]["init_args"].get("init_from")
    if init_from and not resolve_path(init_from).exists():
        return ("--model.init_args.init_from=null",), f" (init_from {init_from} not found: student = teacher copy)"
    return (), ""


class StepTimer(L.Callback):
    """Seconds of each training step after ``warmup`` steps (``training_step`` with its
    backward and optimizer step), and of the gaps between steps (data loading, loop).

    ``phase(module, step)`` names the kind of a step (default :func:`step_kind`);
    ``steps[kind]`` lists the seconds of each."""

    def __init__(self, warmup: int, phase=step_kind):
        self.warmup = warmup
        self.phase = phase
        self.steps: dict[str, list[float]] = {}
        self.gaps: list[float] = []
        self._end: float | None = None

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        synchronize(module.device)
        self._start = time.perf_counter()
        if self._end is not None and trainer.global_step > self.warmup:
            self.gaps.append(self._start - self._end)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        synchronize(module.device)
        self._end = time.perf_counter()
        step = trainer.global_step - 1
        if step >= self.warmup:
            self.steps.setdefault(self.phase(module, step), []).append(self._end - self._start)
