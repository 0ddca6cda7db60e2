#!/usr/bin/env python
"""One JSON and one markdown table from the runs of scripts/gpu_report.sh, one section per family.

Reads the JSON of ``scripts/benchmark_family.py --sampling`` of each family and puts beside
each measured peak the ``distill-pl estimate-memory`` peak of the same step for that family's
KD and DMD2 configs (one device, the benchmark's micro-batch and checkpointing, no sharding,
the config's own precision and loaded batch). ``--teacher FAMILY FOLDER`` estimates with
``model.init_args.teacher`` and ``vae_path`` replaced by FOLDER (copies of the configs go to
``OUT_DIR/estimate_configs/``): the tiny Cosmos configs name a teacher folder that
``scripts/make_tiny_cosmos_transfer.py`` writes.

    .venv/bin/python scripts/gpu_report.py OUT_DIR --family wan WAN_JSON KD_CONFIG DMD2_CONFIG \\
        --family cosmos COSMOS_JSON KD_CONFIG DMD2_CONFIG [--teacher cosmos FOLDER]

``--context_parallel JSON...``: the runs of ``scripts/check_context_parallel.py`` (context
parallel vs one process), one more section with a row per run and phase.

``gpu_report.json``: ``{"families": {name: {"benchmark": ..., "estimated_peak_gib": {phase:
GiB}, "estimate_configs": {"kd": ..., "dmd2": ...}, "estimate_teacher": FOLDER or null}},
"context_parallel": [run, ...]}``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
#: benchmark phase -> (stage config, estimate-memory phase name)
ESTIMATED = {"kd": ("kd", "kd"), "dmd2_critic": ("dmd2", "critic"), "dmd2_generator": ("dmd2", "generator")}


def estimated_peaks(configs: dict[str, str], batch_size: int, checkpointing: bool) -> dict[str, float]:
    """GiB per phase from estimate_memory on one device."""
    from distill_pl.scale.memory_estimate import GIB, estimate_memory

    peaks = {}
    for phase, (stage, name) in ESTIMATED.items():
        estimate = estimate_memory(configs[stage], devices=1, micro_batch=batch_size,
                                   gradient_checkpointing=checkpointing)
        peaks[phase] = estimate.peak(name) / GIB if name in estimate.phases else estimate.total / GIB
    return peaks


def with_teacher(config: str, teacher: str, out: Path) -> str:
    """A copy of ``config`` at ``out`` whose teacher (and VAE, if it has one) is ``teacher``."""
    cfg = yaml.safe_load(Path(config).read_text())
    args = cfg["model"]["init_args"]
    args["teacher"] = str(Path(teacher).resolve())
    if args.get("vae_path"):
        args["vae_path"] = args["teacher"]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return str(out)


def number(value: float | None, spec: str, suffix: str = "") -> str:
    return "n/a" if value is None else f"{value:{spec}}{suffix}"


def family_markdown(entry: dict) -> list[str]:
    """The section of one family: its setup, the step table and the sampling table."""
    b = entry["benchmark"]
    configs = entry["estimate_configs"]
    req = b["requested"]
    lines = [
        f"## {b['model']}",
        "",
        f"{b['params_per_network']:,} parameters per network, {b['precision']}, batch {b['batch_size']}, "
        f"text {b['text_len']} x {b['text_dim']}, requested {req['frames']}x{req['height']}x{req['width']} "
        f"(latents {'x'.join(map(str, req['latent'][1:]))}, {req['tokens_per_video']:,} tokens), "
        f"median of {b['steps']} steps after {b['warmup']}"
        f"{' at ' + str(b['warmup_frames']) + ' frames' if b.get('warmup_frames') else ''}.",
        f"Estimated: `distill-pl estimate-memory` of `{configs['kd']}` and `{configs['dmd2']}` (one device, "
        f"micro-batch {b['batch_size']}, the config's precision; it also counts the micro-batch's pixels, the VAE "
        "and the KD stage's teacher, which the benchmark does not hold)"
        + (f", teacher folder `{entry['estimate_teacher']}`" if entry.get("estimate_teacher") else "") + ".",
        "",
    ]
    compiled = any("compiled_s_per_step" in p for p in b["phases"])
    extra = " compiled s/step | eager/compiled |" if compiled else ""
    lines += [f"| step | video FxHxW | s/step | peak GiB measured | peak GiB estimated | TFLOP/step | MFU |{extra}",
              "|---|---|---:|---:|---:|---:|---:|" + ("---:|---:|" if compiled else "")]
    for p in b["phases"]:
        mfu = None if p["mfu"] is None else 100 * p["mfu"]
        cells = (p["phase"], f"{p['frames']}x{p['height']}x{p['width']}", f"{p['s_per_step']:.3f}",
                 number(p["peak_gib"], ".3g"), number(entry["estimated_peak_gib"].get(p["phase"]), ".3g"),
                 f"{p['model_tflop_per_step']:.4g}", number(mfu, ".1f", "%"),
                 *((f"{p['compiled_s_per_step']:.3f}", f"{p['compile_speedup']:.2f}x") if compiled else ()))
        lines.append("| " + " | ".join(cells) + " |")
    closed = b["forward_flops"]["closed_form"]
    lines += ["", f"One forward: {b['forward_flops']['counted'] / 1e12:.4g} TFLOP counted (FlopCounterMode, meta)"
              + ("; no closed form." if closed is None else f", {closed / 1e12:.4g} closed form.")]
    s = b.get("sampling")
    if s:
        size = f"{s['frames']}x{s['height']}x{s['width']}"
        teacher = f"{s['teacher_s_per_video']:.2f}" + (" (extrapolated)" if s["teacher_extrapolated"] else "")
        lines += [
            "",
            "| sampling one video | FxHxW | network calls | s/video |",
            "|---|---|---:|---:|",
            f"| teacher {s['teacher_steps']}-step CFG w={s['guidance']:g} ({s['scheduler']}) | {size} | "
            f"{s['teacher_nfe']} | {teacher} |",
            f"| student 1-step | {size} | 1 | {s['student_s_per_video']:.3f} |",
            "",
            f"teacher s/video: {s['teacher_s_per_video_from']}; speed-up {s['speedup']:.1f}x "
            f"(ceiling {s['teacher_nfe']}x)",
        ]
    return lines


def context_parallel_markdown(runs: list[dict]) -> list[str]:
    """The context-parallel section: per run (group, dtype, sharding) and phase, the loss of one
    process and of the split, the largest relative gradient error, seconds and peak GiB per
    process of both (the processes share one device: seconds are not a speed-up)."""
    lines = ["## Context parallel vs one process (scripts/check_context_parallel.py)", "",
             "gloo processes on one device; gradient error: ||g_split - g_one|| / ||g_one|| of the trained "
             "networks (largest); seconds and peaks per process, one call each (the first includes warm-up).", "",
             "| model | latents | group | dtype | sharding | phase | loss one / split | gradient error | "
             "s one / split | peak GiB one / split |",
             "|---|---|---|---|---|---|---|---:|---|---|"]
    for run in runs:
        head = (f"| {run['model']} | {'x'.join(map(str, run['latents'][2:]))} | ulysses {run['ulysses']} x ring "
                f"{run['ring']} | {run['dtype']} | {run['sharding']} |")
        if "error" in run:
            lines.append(f"{head} all | failed: {run['error']} | | | |")
            continue
        for row in run["rows"]:
            error = max(row["gradient_relative_error"].values())
            lines.append(
                f"{head} {row['phase']} | {row['loss_reference']:.6g} / {row['loss_split']:.6g} | {error:.2e} | "
                f"{row['seconds_reference']:.3f} / {row['seconds_split']:.3f} | "
                f"{number(row['peak_gib_reference'], '.3g')} / {number(row['peak_gib_split'], '.3g')} |")
    return lines


def markdown(report: dict) -> str:
    first = next(iter(report["families"].values()))["benchmark"]
    lines = [f"# GPU report: {first['device']}, {first['date']}, torch {first['torch']}, "
             f"diffusers {first['diffusers']}"]
    for entry in report["families"].values():
        lines += [""] + family_markdown(entry)
    if report.get("context_parallel"):
        lines += [""] + context_parallel_markdown(report["context_parallel"])
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out_dir")
    parser.add_argument("--family", nargs=4, action="append", required=True,
                        metavar=("NAME", "BENCHMARK_JSON", "KD_CONFIG", "DMD2_CONFIG"))
    parser.add_argument("--teacher", nargs=2, action="append", default=[], metavar=("NAME", "FOLDER"),
                        help="estimate NAME's configs with this teacher (and VAE) folder")
    parser.add_argument("--context_parallel", nargs="+", default=[], metavar="JSON",
                        help="runs of scripts/check_context_parallel.py")
    args = parser.parse_args(argv)
    out = Path(args.out_dir)
    teachers = dict(args.teacher)
    families = {}
    for name, benchmark_json, kd, dmd2 in args.family:
        benchmark = json.loads(Path(benchmark_json).read_text())
        configs = {"kd": kd, "dmd2": dmd2}
        used = dict(configs)
        if name in teachers:
            used = {stage: with_teacher(config, teachers[name], out / "estimate_configs" / f"{name}_{stage}.yaml")
                    for stage, config in configs.items()}
        peaks = estimated_peaks(used, benchmark["batch_size"], benchmark["gradient_checkpointing"])
        families[name] = {"benchmark": benchmark, "estimated_peak_gib": peaks, "estimate_configs": configs,
                          "estimate_teacher": teachers.get(name)}
    report = {"families": families,
              "context_parallel": [json.loads(Path(file).read_text()) for file in args.context_parallel]}
    from distill_pl.util.media import atomic_write

    for file, text in (("gpu_report.json", json.dumps(report, indent=2)), ("gpu_report.md", markdown(report))):
        with atomic_write(out / file) as tmp:
            tmp.write_text(text)
    print(markdown(report))
    return report


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()
