"""scripts/benchmark_data.py with tiny sizes: every figure is reported and consistent."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "benchmark_data.py"
_spec = importlib.util.spec_from_file_location("benchmark_data", SCRIPT)
benchmark_data = importlib.util.module_from_spec(_spec)
sys.modules["benchmark_data"] = benchmark_data
_spec.loader.exec_module(benchmark_data)


def test_tiny_run_reports_sizes_rates_and_memory(one_thread):
    report = benchmark_data.main(["--tiny-examples", "8", "--shard-size", "4", "--full-examples", "1",
                                  "--rss-sizes", "4", "8", "--rss-reads", "2"])
    tiny = report["tiny"]
    # a bf16 teacher output of 3x8x32x32 is 48 KiB; prompts, seeds and the header add a little
    assert 3 * 8 * 32 * 32 * 2 < tiny["bytes_per_example"] < 3 * 8 * 32 * 32 * 2 + 20_000
    assert tiny["write_examples_per_s"] > 0 and tiny["read_examples_per_s"] > 0 and tiny["read_cached_examples_per_s"] > 0
    wan = report["wan2.1_81x480x832"]
    # one example per shard: bf16 latents (4.2 MB), its own bf16 umT5 embedding (4.2 MB) and
    # the float32 negative prompt (8.4 MB)
    latents, text = 16 * 21 * 60 * 104 * 2, 512 * 4096 * 2
    assert latents + text + 2 * text < wan["bytes_per_example"] < latents + 3 * text + 100_000
    assert wan["within_target"] is False and wan["read_examples_per_s"] is None
    assert set(report["peak_rss_mb"]["by_examples"]) == {"4", "8"}
    assert all(mb > 50 for mb in report["peak_rss_mb"]["by_examples"].values())
    streaming = report["streaming"]
    if streaming is not None:  # litdata installed (scripts/setup.sh)
        assert streaming["examples"] == 8 and streaming["optimize_examples_per_s"] > 0
        assert streaming["local_loader_examples_per_s"] > 0 and streaming["streaming_loader_examples_per_s"] > 0
