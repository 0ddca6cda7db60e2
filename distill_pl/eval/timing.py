"""Generation and timing of the evaluated methods, interleaved, and what the timings warrant.

Batches are generated round-robin: batch 0 of every method, then batch 1 of every method, and
so on, so that a change of load on the machine hits the teacher and the students alike and
the speed-ups (ratios of seconds per video) stay comparable. Each method's first batch is its
warm-up (see ``seconds_per_video`` in :mod:`distill_pl.eval.evaluate`).
"""

from __future__ import annotations

import statistics
import time

import torch
from torch import Tensor

from distill_pl.eval.methods import Method
from distill_pl.models.conditioning import Conditioning
from distill_pl.util.progress import ProgressLines


def generate_interleaved(
    methods: list[Method], noise: Tensor, cond: Conditioning, uncond: Conditioning, batch_size: int, autoencoder
) -> dict[str, tuple[Tensor, list[float]]]:
    """{method key: (videos [E, 3, T, H, W] in [-1, 1], seconds of each batch)}: sampling +
    decoding, wall clock, batches of every method in turn."""
    starts = list(range(0, noise.shape[0], batch_size))
    made: dict[str, tuple[list[Tensor], list[float]]] = {m.key: ([], []) for m in methods}
    progress = ProgressLines("evaluate: generation", len(starts) * len(methods), "batches", force=True)
    for number, start in enumerate(starts, start=1):
        rows = slice(start, start + batch_size)
        for method in methods:
            began = time.perf_counter()
            with torch.no_grad():
                x0 = method.sample(noise[rows], cond.select(rows), uncond.select(rows))
                video = autoencoder.decode(x0).float().clamp(-1, 1)
            made[method.key][1].append(time.perf_counter() - began)
            made[method.key][0].append(video)
        if methods:
            progress.advance(len(methods), f"batch {number}/{len(starts)} of {len(methods)} methods")
    return {key: (torch.cat(videos), seconds) for key, (videos, seconds) in made.items()}


def timing_warnings(rows: list[dict], batch_seconds: dict[str, list[float]], timing_runs: dict[str, str],
                    spread_limit: float) -> list[str]:
    """Reasons to distrust the speed columns of the report ``rows`` (the first is the reference):

    - a speed-up above its NFE ceiling (more than the ratio of network calls);
    - a method whose timed batches (after the warm-up) deviate from their median by more than
      ``spread_limit`` (a fraction);
    - methods timed in different runs (videos reused from an earlier evaluation).
    """
    warnings = []
    for row in rows[1:]:
        if row["speedup_fraction_of_ceiling"] > 1.0:
            warnings.append(
                f"{row['name']}: speed-up {row['speedup']:.1f}x exceeds its NFE ceiling {row['nfe_ratio']:.3g}x "
                f"({100 * row['speedup_fraction_of_ceiling']:.0f}%): load on the machine while timing, or work "
                "outside the network calls (scheduler, CFG combination) in the reference's steps")
    for row in rows:
        timed = batch_seconds[row["key"]][1:] or batch_seconds[row["key"]]
        median = statistics.median(timed)
        spread = max(abs(s - median) for s in timed) / median if median > 0 else 0.0
        if spread > spread_limit:
            warnings.append(f"{row['name']}: batch times vary by up to {100 * spread:.0f}% around their median "
                            f"(limit {100 * spread_limit:.0f}%): the machine was busy; rerun on an idle one")
    runs = {timing_runs[row["key"]] for row in rows}
    if len(runs) > 1:
        warnings.append("methods were timed in different runs (videos reused from an earlier evaluation): "
                        "delete out/videos to time them together")
    return warnings
