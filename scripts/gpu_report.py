#!/usr/bin/env python
"""One JSON and one markdown table from the runs of scripts/gpu_report.sh.

Reads the JSON of ``scripts/benchmark_wan.py --sampling`` and puts beside each measured peak
the ``distill-pl estimate-memory`` peak of the same step (the configs of ``--kd_config`` and
``--dmd2_config``, one device, the benchmark's micro-batch and checkpointing, no sharding).

    .venv/bin/python scripts/gpu_report.py BENCHMARK_JSON OUT_DIR [--kd_config ...] [--dmd2_config ...]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
#: benchmark phase -> (stage config, estimate-memory phase name)
ESTIMATED = {"kd": ("kd", "kd"), "dmd2_critic": ("dmd2", "critic"), "dmd2_generator": ("dmd2", "generator")}


def estimated_peaks(configs: dict[str, str], batch_size: int, checkpointing: bool) -> dict[str, float]:
    """GiB per phase from estimate_memory on one device."""
    from distill_pl.memory_estimate import GIB, estimate_memory

    peaks = {}
    for phase, (stage, name) in ESTIMATED.items():
        estimate = estimate_memory(configs[stage], devices=1, micro_batch=batch_size,
                                   gradient_checkpointing=checkpointing)
        peaks[phase] = estimate.peak(name) / GIB if name in estimate.phases else estimate.total / GIB
    return peaks


def number(value: float | None, spec: str, suffix: str = "") -> str:
    return "n/a" if value is None else f"{value:{spec}}{suffix}"


def markdown(report: dict) -> str:
    b = report["benchmark"]
    lines = [
        f"GPU report: {b['device']}, {b['date']}, torch {b['torch']}, {b['model']}, {b['precision']}, "
        f"batch {b['batch_size']}, text {b['text_len']} tokens",
        "",
        "| step | video FxHxW | s/step | peak GiB measured | peak GiB estimated | TFLOP/step | MFU |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for p in b["phases"]:
        mfu = None if p["mfu"] is None else 100 * p["mfu"]
        cells = (p["phase"], f"{p['frames']}x{p['height']}x{p['width']}", f"{p['s_per_step']:.3f}",
                 number(p["peak_gib"], ".1f"), number(report["estimated_peak_gib"].get(p["phase"]), ".1f"),
                 f"{p['model_tflop_per_step']:.4g}", number(mfu, ".1f", "%"))
        lines.append("| " + " | ".join(cells) + " |")
    s = b.get("sampling")
    if s:
        lines += [
            "",
            "| sampling one video | FxHxW | network calls | s/video |",
            "|---|---|---:|---:|",
            f"| teacher {s['teacher_steps']}-step CFG w={s['guidance']:g} | {s['frames']}x{s['height']}x{s['width']} | "
            f"{s['teacher_nfe']} | {s['teacher_s_per_video']:.2f} |",
            f"| student 1-step | {s['frames']}x{s['height']}x{s['width']} | 1 | {s['student_s_per_video']:.3f} |",
            "",
            f"speed-up {s['speedup']:.1f}x (ceiling {s['teacher_nfe']}x)",
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("benchmark_json")
    parser.add_argument("out_dir")
    parser.add_argument("--kd_config", default="configs/wan2.1-t2v-1.3b/kd.yaml")
    parser.add_argument("--dmd2_config", default="configs/wan2.1-t2v-1.3b/dmd2.yaml")
    args = parser.parse_args(argv)
    benchmark = json.loads(Path(args.benchmark_json).read_text())
    peaks = estimated_peaks({"kd": args.kd_config, "dmd2": args.dmd2_config}, benchmark["batch_size"],
                            benchmark["gradient_checkpointing"])
    report = {"benchmark": benchmark, "estimated_peak_gib": peaks,
              "estimate_configs": {"kd": args.kd_config, "dmd2": args.dmd2_config}}
    from distill_pl.media import atomic_write

    for name, text in (("gpu_report.json", json.dumps(report, indent=2)), ("gpu_report.md", markdown(report))):
        with atomic_write(Path(args.out_dir) / name) as tmp:
            tmp.write_text(text)
    print(markdown(report))
    return report


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()
