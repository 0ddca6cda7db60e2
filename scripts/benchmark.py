#!/usr/bin/env python
"""What distillation buys in speed, and what the stages cost, in one run on one machine.

Prints one table:

- sampling: seconds per video of the teacher's N-step CFG sampler and of a one-step
  student (median of ``--repeats`` batches of ``--batch`` videos, after a warm-up batch),
  the speed-up, the NFE ratio (its ceiling: 72 for 36 steps with CFG) and the fraction of
  the ceiling reached;
- training: seconds per KD step and per DMD2 critic / student step (median after warm-up
  steps; data loading between steps reported apart), with the peak memory of the process;
- data: clips per second from the clips loader (decoded videos cached in memory after the
  first pass, as in training) and the seconds of that first pass.

Each part runs in its own process so its peak memory is its own: on the CPU the peak
resident set size of that process (Python, torch and data included), on a GPU the peak
memory torch allocated there.

    .venv/bin/python scripts/benchmark.py                   # CPU, the tiny configs
    .venv/bin/python scripts/benchmark.py --device cuda     # on a GPU, then the full-size
                                                            # Wan2.1-1.3B steps (benchmark_family.py --family wan)

The student defaults to ``runs/tiny/dmd2/export`` and KD reads ``runs/tiny/kd_pairs``
(written by ``scripts/demo.sh``); without them the student is the teacher's weights (same
network, same cost) and the KD part is skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
PARTS = ("sampling", "kd", "dmd2", "loader")


def _device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        sys.exit("benchmark: --device cuda but torch sees no GPU")
    return torch.device(name)


def bench_sampling(args) -> dict:
    from distill_pl.scale.benchmarking import median_time, peak_memory_mb
    from distill_pl.data.datamodule import VideoDataModule
    from distill_pl.eval.evaluate import held_out_clips
    from distill_pl.eval.methods import student_method, teacher_method
    from distill_pl.models.autoencoder import build_autoencoder
    from distill_pl.models.conditioning import Conditioning
    from distill_pl.families.registry import load_denoiser
    from distill_pl.models.guidance import negative_conditioning
    from distill_pl.export.model_folders import load_scheduler

    device = _device(args.device)
    student_path = args.student if Path(args.student).exists() else args.teacher
    teacher = load_denoiser(args.teacher).eval().to(device)
    student = load_denoiser(student_path).eval().to(device)
    data = VideoDataModule(val_clips_per_video=max(1, args.batch // 4 + 1), batch_size=args.batch)
    clips = held_out_clips(data)
    index = torch.arange(args.batch) % clips["video"].shape[0]
    autoencoder = build_autoencoder(None)
    control = teacher.encode_control(clips["control"].float(), autoencoder)
    cond = Conditioning(clips["text_embeds"], clips["text_mask"], control).select(index).to(device)
    uncond = negative_conditioning(cond, *(t.to(device) for t in data.negative_prompt_embedding()))
    noise = torch.randn(clips["video"][index].shape, generator=torch.Generator().manual_seed(0)).to(device)
    methods = [teacher_method(teacher, load_scheduler(args.teacher), args.steps, args.guidance),
               student_method("student", student)]
    methods[1].name = "one-step student"
    result = {"batch": args.batch, "student": student_path}
    for method in methods:
        with torch.no_grad():
            seconds = median_time(lambda: autoencoder.decode(method.sample(noise, cond, uncond)).sum().item(),
                                  args.repeats, device)
        result[method.key] = {"name": method.name, "nfe": method.nfe, "seconds_per_video": seconds / args.batch}
    result["peak_memory_mb"] = peak_memory_mb(device)
    return result


def bench_training(args, config: str) -> dict:
    from distill_pl.scale.benchmarking import StepTimer, missing_init_from_override, peak_memory_mb
    from distill_pl.cli.main import benchmark_cli

    device = _device(args.device)
    extra, _ = missing_init_from_override(config)
    cli = benchmark_cli(config, args.warmup + args.train_steps, args.device, extra)
    timer = StepTimer(args.warmup)
    cli.trainer.callbacks.append(timer)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    result = {kind: statistics.median(times) for kind, times in timer.steps.items()}
    result["between_steps"] = statistics.median(timer.gaps)
    result["batch"] = cli.datamodule.hparams.batch_size
    result["peak_memory_mb"] = peak_memory_mb(device)
    return result


def bench_loader(args) -> dict:
    from distill_pl.data.datamodule import VideoDataModule

    data = VideoDataModule(batch_size=args.batch, samples_per_epoch=args.batch * args.loader_batches)
    data.setup("fit")
    loader = data.train_dataloader()
    start = time.perf_counter()
    batches = iter(loader)
    next(batches)  # the first batch decodes each video once into the in-memory cache
    first = time.perf_counter() - start
    start = time.perf_counter()
    count = sum(b["video"].shape[0] for b in batches)
    return {"first_batch_s": first, "clips_per_s": count / (time.perf_counter() - start), "clips": count}


def run_part(part: str, args) -> dict | None:
    """Run one part in a fresh process and return its result (None if it was skipped)."""
    command = [sys.executable, __file__, "--part", part, *sys.argv[1:]]
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        sys.stderr.write(done.stdout[-3000:] + done.stderr[-3000:])
        sys.exit(f"benchmark: part {part!r} failed (exit {done.returncode}); its output is above")
    return json.loads(lines[-1][len("RESULT "):])


def report(results: dict, args) -> None:
    device = torch.cuda.get_device_name() if args.device == "cuda" else (platform.processor() or platform.machine())
    print(f"machine: {device}, {os.cpu_count()} CPU cores, torch {torch.__version__}, "
          f"{args.threads or torch.get_num_threads()} threads, {time.strftime('%Y-%m-%d')}")
    s = results["sampling"]
    teacher, student = s[f"teacher_{args.steps}step"], s["student_student"]
    speedup = teacher["seconds_per_video"] / student["seconds_per_video"]
    ceiling = teacher["nfe"] / student["nfe"]
    memory = "peak GPU memory allocated" if args.device == "cuda" else "peak process RSS"
    print(f"\n| what | figure | {memory} |\n|---|---|---:|")
    print(f"| {teacher['name']} ({teacher['nfe']} NFE) | {teacher['seconds_per_video']:.4f} s/video "
          f"(batch {s['batch']}) | {s['peak_memory_mb']:.0f} MiB |")
    print(f"| {student['name']} ({student['nfe']} NFE) | {student['seconds_per_video']:.4f} s/video | |")
    print(f"| speed-up | {speedup:.1f}x of a {ceiling:.0f}x NFE ceiling = {100 * speedup / ceiling:.0f}% | |")
    if results.get("kd"):
        k = results["kd"]
        print(f"| KD step (batch {k['batch']}) | {k['step']:.3f} s (+ {k['between_steps']:.3f} s between steps) "
              f"| {k['peak_memory_mb']:.0f} MiB |")
    else:
        print("| KD step | skipped: no runs/tiny/kd_pairs (run scripts/demo.sh first) | |")
    d = results["dmd2"]
    print(f"| DMD2 critic step (batch {d['batch']}) | {d['critic']:.3f} s | {d['peak_memory_mb']:.0f} MiB |")
    print(f"| DMD2 student step | {d['student']:.3f} s (+ {d['between_steps']:.3f} s between steps) | |")
    loader = results["loader"]
    print(f"| clips loader (batch {args.batch}) | {loader['clips_per_s']:.0f} clips/s after a first batch of "
          f"{loader['first_batch_s']:.2f} s (decoding each video once) | |")
    print(f"\nstudent: {s['student']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default="teachers/tiny")
    parser.add_argument("--student", default="runs/tiny/dmd2/export")
    parser.add_argument("--steps", type=int, default=36, help="teacher sampling steps")
    parser.add_argument("--guidance", type=float, default=8.0, help="teacher CFG weight w")
    parser.add_argument("--batch", type=int, default=8, help="videos per sampling call, clips per loader batch")
    parser.add_argument("--repeats", type=int, default=5, help="timed sampling batches")
    parser.add_argument("--kd_config", default="configs/tiny/kd.yaml")
    parser.add_argument("--dmd2_config", default="configs/tiny/dmd2.yaml")
    parser.add_argument("--train_steps", type=int, default=20, help="timed training steps (a multiple of 5)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--loader_batches", type=int, default=20)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--no_wan", action="store_true",
                        help="with --device cuda: skip the full-size Wan2.1-1.3B part (scripts/benchmark_family.py)")
    parser.add_argument("--part", choices=PARTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    os.chdir(REPO)
    if args.part is None:
        results = {}
        for part in PARTS:
            if part == "kd" and not (REPO / "runs/tiny/kd_pairs/train").is_dir():
                results[part] = None
                continue
            print(f"benchmarking {part} ...", flush=True)
            results[part] = run_part(part, args)
        report(results, args)
        if args.device == "cuda" and not args.no_wan:
            print("\nfull-size Wan2.1-T2V-1.3B architecture (scripts/benchmark_family.py --family wan):", flush=True)
            subprocess.run([sys.executable, str(REPO / "scripts/benchmark_family.py"), "--family", "wan",
                            "--device", "cuda"], check=True)
        return
    sys.argv = sys.argv[:1]  # LightningCLI inside must not see these arguments
    result = {"sampling": lambda: bench_sampling(args), "kd": lambda: bench_training(args, args.kd_config),
              "dmd2": lambda: bench_training(args, args.dmd2_config), "loader": lambda: bench_loader(args)}[args.part]()
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
