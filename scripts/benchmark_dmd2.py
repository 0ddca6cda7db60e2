#!/usr/bin/env python
"""DMD2 step time of configs/tiny/dmd2.yaml, and the network passes a step contains.

Builds model and data from the config as ``distill-pl fit`` does, then

1. runs ``--warmup`` + ``--steps`` real training steps through a Trainer and reports the
   median seconds of a critic step and of a student (generator) step (``training_step``:
   forward, backward, gradient norms, optimizer step), and the median time between steps
   (data loading and Lightning's loop);
2. times each network pass of a step on one batch, median of ``--repeats``:
   critic step = student 1-step (no grad) + fake score forward on fake+real (2B, with
   features) + critic backward + critic AdamW step;
   student step = student 1-step (grad) + teacher forward with CFG (cond+uncond, 2B, no grad)
   + fake score forward (B, features, grad to the input) + generator backward + student
   AdamW step;
   and prints their sum next to the measured step time.

    .venv/bin/python scripts/benchmark_dmd2.py --threads 1     # CPU, one torch thread
    .venv/bin/python scripts/benchmark_dmd2.py --device cuda

On a 2-core machine that other processes share, torch's default of 2 threads oversubscribes
the cores and a tiny step gets about 10x slower; compare timings at the same ``--threads``.

If the config's ``init_from`` checkpoint does not exist yet, the student starts from the
teacher (same networks, same cost).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys

import torch

from distill_pl.scale.benchmarking import StepTimer, median_time, missing_init_from_override
from distill_pl.cli.main import benchmark_cli
from distill_pl.diffusion.flow import add_noise
from distill_pl.models.guidance import velocity_fn
from distill_pl.training.dmd2 import DMD2Module


def network_passes(module: DMD2Module, batch: dict, repeats: int) -> dict[str, float]:
    """Median seconds of each pass of a DMD2 step on ``batch`` (already on the device)."""
    device = module.device
    k = module.feature_block
    objective = module.objective
    cond = module.conditioning(batch)
    uncond = module.null_conditioning(cond)
    shape = module.latent_shape(batch["video"])
    g = torch.Generator().manual_seed(0)
    eps, noise, noise_real = (torch.randn(shape, generator=g).to(device) for _ in range(3))
    sigma = torch.rand(shape[0], generator=g).to(device)
    x_real = module.autoencoder.encode(batch["video"])
    both = type(cond).cat([cond, cond])
    critic_opt, student_opt = module.trainer.optimizers
    t = {}

    with torch.no_grad():
        x_g = objective.generate(eps, cond)
    x_t = add_noise(x_g, noise, sigma)
    t["student 1-step, no grad (B)"] = median_time(lambda: objective.generate(eps, cond).sum().item(), repeats, device)

    def fake_2b():
        x = torch.cat([x_t, add_noise(x_real, noise_real, sigma)])
        return module.fake_score(x, sigma.repeat(2), both, feature_block=k)

    t["fake score fwd, fake+real (2B), grad"] = median_time(lambda: fake_2b()[0].sum().item(), repeats, device)

    def critic_fwd_bwd():
        critic_opt.zero_grad(set_to_none=True)
        loss, _ = objective.critic_loss(x_g, x_real, sigma, noise, noise_real, cond)
        loss.backward()

    t["critic backward"] = median_time(critic_fwd_bwd, repeats, device) - t["fake score fwd, fake+real (2B), grad"]
    t["critic AdamW step"] = median_time(critic_opt.step, repeats, device)
    critic_opt.zero_grad(set_to_none=True)

    def student_grad():
        return objective.generate(eps, cond)

    module.fake_score.requires_grad_(False)
    module.discriminator.requires_grad_(False)
    t["student 1-step, grad (B)"] = median_time(lambda: student_grad().sum().item(), repeats, device)
    teacher = velocity_fn(module.teacher, cond, uncond, module.hparams.guidance)
    with torch.no_grad():
        t["teacher fwd with CFG (2B), no grad"] = median_time(lambda: teacher(x_t, sigma).sum().item(), repeats, device)

    def fake_b_input_grad():
        x = x_t.detach().requires_grad_(True)
        return module.fake_score(x, sigma, cond, feature_block=k)

    t["fake score fwd (B), grad to input"] = median_time(lambda: fake_b_input_grad()[1].sum().item(), repeats, device)

    def generator_fwd_bwd():
        student_opt.zero_grad(set_to_none=True)
        x = objective.generate(eps, cond)
        loss, _ = objective.generator_loss(x, sigma, noise, cond, uncond)
        loss.backward()

    forwards = sum(t[k] for k in ("student 1-step, grad (B)", "teacher fwd with CFG (2B), no grad",
                                  "fake score fwd (B), grad to input"))
    t["generator backward"] = median_time(generator_fwd_bwd, repeats, device) - forwards
    t["student AdamW step"] = median_time(student_opt.step, repeats, device)
    student_opt.zero_grad(set_to_none=True)
    module.fake_score.requires_grad_(True)
    module.discriminator.requires_grad_(True)
    return t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/tiny/dmd2.yaml")
    parser.add_argument("--steps", type=int, default=40, help="timed training steps (a multiple of 5)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=10, help="repeats of each network pass")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    sys.argv = sys.argv[:1]  # the CLI below parses its own argument list

    extra, note = missing_init_from_override(args.config)
    cli = benchmark_cli(args.config, args.warmup + args.steps, args.device, extra)
    timer = StepTimer(args.warmup)
    cli.trainer.callbacks.append(timer)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)

    module: DMD2Module = cli.model
    batch = next(iter(cli.datamodule.train_dataloader()))
    batch = {k: v.to(module.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    passes = network_passes(module, batch, args.repeats)

    crit, stud = statistics.median(timer.steps["critic"]), statistics.median(timer.steps["student"])
    per_cycle = (module.hparams.student_update_freq - 1) * crit + stud
    freq = module.hparams.student_update_freq
    gap = statistics.median(timer.gaps)
    device = torch.cuda.get_device_name() if args.device == "cuda" else (platform.processor() or platform.machine())
    print(f"machine: {device}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"config: {args.config}{note}; batch {cli.datamodule.hparams.batch_size}, "
          f"latents {list(module.latent_shape(batch['video']))}")
    print(f"timed: {len(timer.steps['critic'])} critic + {len(timer.steps['student'])} student steps "
          f"after {args.warmup} warm-up steps")
    print(f"critic step   {crit:.3f} s (median)")
    print(f"student step  {stud:.3f} s (median)")
    print(f"mean DMD2 step {per_cycle / freq:.3f} s ({freq - 1}:1), + {gap:.3f} s between steps "
          "(data loading, loop)")
    print(f"\nnetwork passes (median of {args.repeats}):")
    critic_keys = ["student 1-step, no grad (B)", "fake score fwd, fake+real (2B), grad", "critic backward",
                   "critic AdamW step"]
    student_keys = ["student 1-step, grad (B)", "teacher fwd with CFG (2B), no grad",
                    "fake score fwd (B), grad to input", "generator backward", "student AdamW step"]
    for title, keys, measured in (("critic step", critic_keys, crit), ("student step", student_keys, stud)):
        total = sum(passes[k] for k in keys)
        print(f"  {title}:")
        for key in keys:
            print(f"    {key:<40} {passes[key]:.4f} s")
        print(f"    {'sum of passes':<40} {total:.4f} s; measured step {measured:.4f} s "
              f"({measured / total:.2f}x, overhead {measured - total:+.4f} s)")


if __name__ == "__main__":
    main()
