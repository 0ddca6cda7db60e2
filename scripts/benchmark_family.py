#!/usr/bin/env python
"""KD and DMD2 step time, peak memory and MFU of a full-size model family's architecture.

``--family wan``: Wan2.1-T2V-1.3B (``WanTransformer3DModel``), 81 frames at 480x832 (latents
16 x 21 x 60 x 104: the Wan VAE compresses 4x in time, 8x in space; 32,760 tokens per video
after the 1x2x2 patches), 512 text tokens of D = 4096 (umT5), no control.

``--family cosmos``: Cosmos-Transfer2.5-2B, base ``CosmosTransformer3DModel`` + edge
``CosmosControlNetModel`` as one ``CosmosTransferDenoiser`` (2,885,120,000 parameters, the
ControlNet trained with the base), the size of ``configs/cosmos-transfer2.5-2b``: one chunk
of 93 frames at 704x1280 (latents 16 x 24 x 88 x 160, same VAE; 84,480 tokens per video),
512 text tokens of D = 100352 (Qwen2.5-VL-7B, 28 layers x 3584), ``Conditioning.control``
= control latents of the latents' shape [B, 16, T, H, W], ``control_scale`` 1.0.

The networks are the methods' own (``distill_pl.methods``: ``KDRoles`` for ``kd``: student
and bf16 teacher; ``DMD2Roles`` for the DMD2 phases: student, bf16 teacher, fake score,
discriminator head; no EMA), built by the method with random weights directly on the device
from the family registry's denoisers (``config_denoisers``, no download); one method's
networks at a time (the KD networks are freed before the DMD2 ones are built). Batch 1,
per-block gradient checkpointing on (base and ControlNet blocks).
Latents are [B, C, T, H, W], sigma [B] in [0, 1], text [B, L, D]; the control (Cosmos) is
shared by the conditional and unconditional branch. Phases:

- ``kd``: student one-step sample ``x = eps - v(eps, 1)``, MSE to a random target,
  backward, AdamW step on the student.
- ``dmd2_critic``: student generation without grad; fake score forward on fake + real (2B)
  with the features of block ``num_blocks // 2``; fake-score flow-matching loss + the
  discriminator head's loss; backward; AdamW step on fake score + head.
- ``dmd2_generator``: student generation with grad; teacher forward with CFG (cond + uncond,
  2B) without grad; fake score forward (B) with features, gradient to its input only; DMD
  loss + 1e-3 x GAN loss; backward; AdamW step on the student.

The losses are the project's objectives (``distill_pl.methods``: ``KDObjective``,
``DMD2Objective`` from ``dmd2_objective``, CFG ``w`` of the family's DMD2 config: 6 for
both) on those networks, what the stages run without Lightning, micro-batching,
gradient clipping or logging. Each step runs on fixed random inputs; noise levels are drawn
with the shift of the family's teacher scheduler (Wan 3, Cosmos 1).

Precision: ``bf16-mixed`` (default, as the configs train): the trainable networks (student,
fake score, head) hold float32 master weights and AdamW state, the step runs under bf16
autocast; ``bf16-true``: they hold bf16 weights and state. The teacher is always bf16.
(Cosmos-Transfer2.5-2B's DMD2 step in bf16-mixed needs ~115 GiB on one device without the
data batch: ``scripts/gpu_report.sh`` runs that family in bf16-true on one 80 GB GPU.)

Timing: median of ``--steps`` after ``--warmup`` (run on ``--warmup_frames``-frame videos if
given), each step between two device syncs.
Peak memory: ``torch.cuda.max_memory_allocated``, reset before each phase (it includes the
resident weights of the phase's method and the optimizer state of its phases run so far).
FLOPs: counted with ``FlopCounterMode`` on copies of the networks on the meta device (same shapes, no memory;
see ``distill_pl/scale/flops.py``): model FLOPs with checkpointing off, and the recomputation as
the difference with it on. One forward's count is also given in closed form for Wan
(``distill_pl.families.wan.flops.wan_forward_flops``); for Cosmos only the counted FLOPs are reported (no closed form).
MFU = model FLOPs / s per step / the dense bf16 peak of the GPU (``--peak_tflops``, else by
device name: H100 SXM and H200 989, A100 312).

If a phase runs out of GPU memory, it says so and retries with 4 latent frames fewer, down
to 1; the table states the size each phase ran at.

``--sampling`` also times generation of one video at the requested size, without gradients,
bf16 weights: the teacher's ``--sample_steps``-step sampler with CFG (one batched call of
cond + uncond per step, ``w`` of the family's kd_pairs config: 8 for both), the sampler of
the project's pair generation and evaluation (``sample_with_scheduler`` with the teacher's
scheduler and ``step_sigma=teacher.sampler_sigma``; Wan: UniPC with flow shift 3; Cosmos:
the UniPC of ``Cosmos2_5_TransferPipeline``'s folder, Karras flow sigmas, the loop that
``tests/families/test_cosmos_transfer.py`` checks against the pipeline), against the
student's one step ``eps - v(eps, 1)`` (student: median of ``--steps`` after a warm-up).
The teacher: one whole timed video by default; with ``--teacher_timed_steps K``, K sampler
steps after ``--teacher_warmup_steps`` (default 1) of one run, and ``s/video = sample_steps x
median step`` (recorded as ``teacher_s_per_video_from``).

    .venv/bin/python scripts/benchmark_family.py --family wan --device cuda --json wan_benchmark.json
    .venv/bin/python scripts/benchmark_family.py --family cosmos --device cuda --precision bf16-true
    .venv/bin/python scripts/benchmark_family.py --family cosmos --device cpu --tiny   # tiny model, for tests
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import diffusers
import torch
from torch import Tensor

from distill_pl.scale.benchmarking import synchronize
from distill_pl.diffusion.losses import sample_training_sigma
from distill_pl.diffusion.sampling import build_flow_scheduler, one_step_sample, sample_with_scheduler
from distill_pl.scale.flops import count_flops, peak_bf16_tflops
from distill_pl.models.autoencoder import latent_grid
from distill_pl.models.conditioning import Conditioning
from distill_pl.models.denoiser import Denoiser
from distill_pl.families.cosmos_transfer.configs import COSMOS_TRANSFER_2_5_2B, COSMOS_TRANSFER_2_5_SCHEDULER
from distill_pl.families.wan.configs import WAN_2_1_T2V_1_3B
from distill_pl.families.wan.flops import wan_forward_flops
from distill_pl.models.guidance import velocity_fn
from distill_pl.export.model_folders import scheduler_shift
from distill_pl.methods.dmd2 import DMD2Roles, dmd2_objective
from distill_pl.methods.kd import KDObjective, KDRoles
from distill_pl.methods.roles import Roles, config_denoisers

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_tiny_cosmos_transfer as tiny_cosmos  # noqa: E402  (scripts/: the tiny Cosmos sizes)

#: a 2-block model of the same layout for CPU tests
TINY_CONFIG = {
    **WAN_2_1_T2V_1_3B, "attention_head_dim": 32, "num_attention_heads": 2, "ffn_dim": 128,
    "freq_dim": 32, "num_layers": 2, "text_dim": 32,
}
#: the tiny random Cosmos-Transfer2.5 of scripts/make_tiny_cosmos_transfer.py (2 base blocks,
#: 2 ControlNet blocks, width 32, text D = 32; at most 4 x 32 x 32 latents: its ``max_size``)
TINY_COSMOS_CONFIG = {"transformer": tiny_cosmos.TRANSFORMER, "controlnet": tiny_cosmos.CONTROLNET}
#: Wan VAE compression (time, height, width), the VAE of both families
VAE_COMPRESSION = (4, 8, 8)
WAN_TEXT_LEN = 512


@dataclass(frozen=True)
class Family:
    """What differs between the benchmarked architectures; every step, timing and FLOP count
    below is shared. Sizes: ``frames``, ``height``, ``width`` (video) and ``text_len`` (L)."""

    name: str
    class_name: str  #: the family registry's key
    model: str
    config: dict
    tiny_config: dict
    size: dict
    tiny_size: dict
    configs: dict  #: stage -> the family's config file the constants come from
    dmd2_guidance: float  #: DMD2 config's w (generator phase)
    sample_guidance: float  #: kd_pairs config's w (teacher sampling)
    sample_steps: int  #: kd_pairs config's num_steps
    scheduler: Callable[[], object]  #: a fresh teacher-sampler scheduler
    adapter_options: dict = field(default_factory=dict)
    closed_form: Callable | None = None  #: forward FLOPs (config, latent, text_len), if known


FAMILIES = {
    "wan": Family(
        name="wan", class_name="WanTransformer3DModel", model="Wan2.1-T2V-1.3B architecture",
        config=WAN_2_1_T2V_1_3B, tiny_config=TINY_CONFIG,
        size=dict(frames=81, height=480, width=832, text_len=WAN_TEXT_LEN),
        tiny_size=dict(frames=17, height=256, width=256, text_len=8),
        configs={s: f"configs/wan2.1-t2v-1.3b/{s}.yaml" for s in ("kd_pairs", "kd", "dmd2")},
        dmd2_guidance=6.0, sample_guidance=8.0, sample_steps=36,
        scheduler=lambda: build_flow_scheduler("unipc", 3.0),  # Wan's 480p shift
        closed_form=wan_forward_flops,
    ),
    "cosmos": Family(
        name="cosmos", class_name="CosmosTransformer3DModel",
        model="Cosmos-Transfer2.5-2B architecture (base + ControlNet)",
        config=COSMOS_TRANSFER_2_5_2B, tiny_config=TINY_COSMOS_CONFIG,
        size=dict(frames=93, height=704, width=1280, text_len=512),
        tiny_size=dict(frames=9, height=64, width=64, text_len=8),
        configs={s: f"configs/cosmos-transfer2.5-2b/{s}.yaml" for s in ("kd_pairs", "kd", "dmd2")},
        dmd2_guidance=6.0, sample_guidance=8.0, sample_steps=36,
        scheduler=lambda: diffusers.UniPCMultistepScheduler(**COSMOS_TRANSFER_2_5_SCHEDULER),
        adapter_options={"control_scale": 1.0},
    ),
}

PHASES = ("kd", "dmd2_critic", "dmd2_generator")
#: benchmarked phase -> (the roles of its method, the method's phase)
METHOD_PHASES = {"kd": (KDRoles, "KD step"), "dmd2_critic": (DMD2Roles, "critic"),
                 "dmd2_generator": (DMD2Roles, "generator")}
GAN_WEIGHT = 1e-3


def method_settings(family: Family, checkpointing: bool) -> dict:
    """The KD and DMD2 settings of the benchmarked steps, by the stages' argument names: a bf16
    teacher, no EMA, a full fake score, the discriminator on the fake score's middle block,
    the family's DMD2 guidance."""
    return {
        "teacher_dtype": "bfloat16", "gradient_checkpointing": checkpointing, "ema_decay": None,
        "fake_score_lora_rank": None, "fake_score_lora_alpha": None, "fake_score_lora_targets": None,
        "student_lora_rank": None, "student_lora_alpha": None, "student_lora_targets": None,
        "feature_block": None, "discriminator_hidden": 256, "seed": 0,
        "guidance": family.dmd2_guidance, "gan_weight": GAN_WEIGHT, "critic_gan_weight": 1.0,
        "discriminator_on": "fake_score", "trained_step_input": "backward_simulation", "phased_dmd": False,
        "t_min": 0.02, "t_max": 0.98,
    }


@dataclass
class Inputs:
    """Fixed random inputs: latents [B, C, T, H, W], sigma [B], conditionings with text
    [B, L, D] and, for a model with control, control latents [B, Cc, T, H, W]."""

    eps: Tensor
    noise: Tensor
    noise_real: Tensor
    x_real: Tensor
    target: Tensor
    sigma: Tensor
    cond: Conditioning
    uncond: Conditioning


# --- the three steps' losses: the stages' own ------------------------------------------
def kd_step_loss(roles: KDRoles, settings: dict, d: Inputs) -> Tensor:
    return KDObjective(roles.student).loss(d.eps, d.target, d.cond)


def critic_loss(roles: DMD2Roles, settings: dict, d: Inputs) -> Tensor:
    losses = dmd2_objective(roles, settings)
    with torch.no_grad():
        x_g = losses.generate(d.eps, d.cond)
    return losses.critic_loss(x_g, d.x_real, d.sigma, d.noise, d.noise_real, d.cond)[0]


def generator_loss(roles: DMD2Roles, settings: dict, d: Inputs) -> Tensor:
    losses = dmd2_objective(roles, settings)
    return losses.generator_loss(losses.generate(d.eps, d.cond), d.sigma, d.noise, d.cond, d.uncond)[0]


LOSSES = {"kd": kd_step_loss, "dmd2_critic": critic_loss, "dmd2_generator": generator_loss}


def set_trainable(roles: Roles, phase: str) -> None:
    """Gradients for the networks the phase's optimizer updates only (as Lightning's
    ``toggle_optimizer`` does; which ones, the method's roles say); the teacher never gets any."""
    trained = roles.phases[METHOD_PHASES[phase][1]]
    for name in roles.trained:
        getattr(roles, name).requires_grad_(name in trained)


# --- building -----------------------------------------------------------------------------
def build_roles(method: type[Roles], family: Family, config: dict, settings: dict, device,
                compute_dtype: str | None = None) -> Roles:
    """The method's networks built by the method from the family's architecture, random
    weights on ``device`` (``compute_dtype``: the trained networks in it instead of float32)."""
    with torch.device(device):
        return method.from_settings(settings, config_denoisers(family.class_name, config, family.adapter_options),
                                    compute_dtype=compute_dtype)


def make_inputs(net: Denoiser, latent: tuple[int, ...], text_len: int, shift: float, device) -> Inputs:
    """Random float32 inputs on ``device`` (the meta device gives shapes only) for ``net``'s
    text width and control channels; sigma drawn as DMD2 draws it, with ``shift``."""
    b = latent[0]
    make = lambda *shape: torch.randn(shape, device=device)  # noqa: E731
    control = make(b, net.control_channels, *latent[2:]) if net.control_channels else None
    text = lambda: Conditioning(make(b, text_len, net.text_dim), control=control)  # noqa: E731
    sigma = sample_training_sigma(b, shift, 0.02, 0.98, device=device)
    return Inputs(make(*latent), make(*latent), make(*latent), make(*latent), make(*latent), sigma, text(), text())


def latent_shape(batch: int, channels: int, frames: int, height: int, width: int) -> tuple[int, ...]:
    ct, ch, cw = VAE_COMPRESSION
    if (frames - 1) % ct or height % (2 * ch) or width % (2 * cw):
        raise ValueError(
            f"frames {frames} must be 1 + a multiple of {ct}; height {height} and width {width} "
            f"multiples of {2 * ch} (VAE x patch)"
        )
    return batch, channels, *latent_grid(frames, height, width, ct, ch)


def tokens_per_video(patch_size, latent: tuple[int, ...]) -> int:
    pt, ph, pw = patch_size
    return latent[2] // pt * (latent[3] // ph) * (latent[4] // pw)


# --- measuring ----------------------------------------------------------------------------
def time_steps(step, warmup: int, steps: int, device: torch.device) -> list[float]:
    """Seconds of each of ``steps`` calls of ``step()`` after ``warmup`` untimed ones."""
    times = []
    for i in range(warmup + steps):
        synchronize(device)
        start = time.perf_counter()
        step()
        synchronize(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return times


class _StopSampling(Exception):
    """Raised from ``on_step`` to end a sampler run once its timed steps are done."""


def time_sampler_steps(run, warmup: int, timed: int, device: torch.device) -> list[float]:
    """Seconds of sampler steps ``warmup .. warmup + timed - 1`` of one ``run(on_step)``
    (``sample_with_scheduler``'s ``on_step``, called before each step is evaluated): step i
    lasts from the call before it to the call before step i + 1 (its network call and
    scheduler update). The run is stopped there; it must have more than ``warmup + timed`` steps."""
    stamps: list[float] = []

    def on_step(i: int, sigma: float, x: Tensor) -> None:
        synchronize(device)
        stamps.append(time.perf_counter())
        if i == warmup + timed:
            raise _StopSampling

    try:
        run(on_step)
    except _StopSampling:
        pass
    else:
        raise ValueError(f"the sampler ran fewer than {warmup + timed + 1} steps")
    return [b - a for a, b in zip(stamps, stamps[1:])][warmup:]


def measure_phase(phase, roles, settings, optimizer, inputs, device, precision, warmup, steps,
                  warmup_inputs=None) -> dict:
    """Median seconds of ``steps`` timed steps on ``inputs`` after ``warmup`` untimed ones (on
    ``warmup_inputs`` if given: a shorter video warms kernels and allocates the AdamW state
    for less time), and the peak memory of all of them."""
    set_trainable(roles, phase)
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16-mixed" else nullcontext()
    )

    def step(d: Inputs = inputs):
        with autocast:
            loss = LOSSES[phase](roles, settings, d)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    time_steps(lambda: step(warmup_inputs or inputs), 0, warmup, device)
    times = time_steps(step, 0, steps, device)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {"s_per_step": statistics.median(times), "times": times, "peak_gib": peak}


def count_phase_flops(phase: str, meta_roles: Roles, settings: dict, inputs: Inputs, checkpointing: bool) -> dict:
    """Model FLOPs (checkpointing off) and recomputed FLOPs (the extra with it on) of a step."""
    set_trainable(meta_roles, phase)

    def counted(enabled: bool) -> int:
        for net in meta_roles.networks().values():
            if isinstance(net, Denoiser):
                net.set_gradient_checkpointing(enabled)
        return count_flops(lambda: LOSSES[phase](meta_roles, settings, inputs).backward())

    model = counted(False)
    total = counted(True) if checkpointing else model
    return {"model_flops": model, "recompute_flops": total - model}


def smaller_frames(frames: int) -> list[int]:
    """``frames``, then 4 latent frames (16 video frames) fewer each, down to 1 frame."""
    return list(range(frames, 0, -4 * VAE_COMPRESSION[0])) + ([1] if (frames - 1) % 16 else [])


def largest_that_fits(phase: str, measure, args, channels: int, optimizers):
    """``(frames, latent shape, measure(latent))`` at ``args.frames``, or at the largest of
    :func:`smaller_frames` that does not run out of GPU memory; None if none fits."""
    for frames in smaller_frames(args.frames):
        latent = latent_shape(args.batch_size, channels, frames, args.height, args.width)
        try:
            return frames, latent, measure(latent)
        except torch.OutOfMemoryError:
            print(f"{phase}: out of memory at {frames} frames {args.height}x{args.width}, retrying smaller",
                  flush=True)
        # outside the except block: the traceback and the step's tensors are gone
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        gc.collect()
        torch.cuda.empty_cache()
    print(f"{phase}: out of memory even at 1 frame; skipped", flush=True)
    return None


def free_memory(device: torch.device) -> None:
    """Collect the freed networks and return a CUDA device's cached blocks to it."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# --- main -----------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--family", choices=sorted(FAMILIES), default="wan",
                   help="wan: Wan2.1-T2V-1.3B; cosmos: Cosmos-Transfer2.5-2B (base + ControlNet)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true",
                   help="2-block model; wan: 17 frames 256x256 (5x32x32 latents), cosmos: 9 frames 64x64 "
                        "(3x8x8); 8 text tokens")
    p.add_argument("--frames", type=int, help="video frames, 1 + 4k (default: the family's size)")
    p.add_argument("--height", type=int, help="pixels (wan 480, cosmos 704)")
    p.add_argument("--width", type=int, help="pixels (wan 832, cosmos 1280)")
    p.add_argument("--batch_size", type=int, default=1)
    p.add_argument("--text_len", type=int, help="text tokens (default 512; tiny 8)")
    p.add_argument("--no_checkpointing", action="store_true", help="turn per-block gradient checkpointing off")
    p.add_argument("--precision", choices=["bf16-mixed", "bf16-true"], default="bf16-mixed")
    p.add_argument("--phases", nargs="+", choices=PHASES, default=list(PHASES))
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup_frames", type=int,
                   help="run the warm-up steps on videos of this many frames (e.g. 1: kernels and AdamW "
                        "state for a fraction of a step's time); default: the measured size")
    p.add_argument("--peak_tflops", type=float, help="dense bf16 peak of the device, TFLOP/s")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--compile", action="store_true",
                   help="also time each phase with regional compilation (every block of student, teacher and "
                        "fake score compiled, Denoiser.compile_blocks) at the eager run's size; prints eager/compiled")
    p.add_argument("--sampling", action="store_true", help="also time teacher N-step CFG vs student 1-step sampling")
    p.add_argument("--sample_steps", type=int, help="teacher sampling steps, CFG (default: the kd_pairs config's, 36)")
    p.add_argument("--teacher_timed_steps", type=int, default=0,
                   help="0: time one whole teacher video; K: time K steps of it and report sample_steps x the median")
    p.add_argument("--teacher_warmup_steps", type=int, default=1,
                   help="untimed teacher steps before the K timed ones (with --teacher_timed_steps)")
    args = p.parse_args(argv)
    family = FAMILIES[args.family]
    for key, value in (family.tiny_size if args.tiny else family.size).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.sample_steps is None:
        args.sample_steps = family.sample_steps
    if args.compile and args.warmup < 1:
        p.error("--compile needs --warmup >= 1 (the blocks compile in the warm-up steps)")
    if args.teacher_timed_steps and args.teacher_warmup_steps + args.teacher_timed_steps >= args.sample_steps:
        p.error("--teacher_warmup_steps + --teacher_timed_steps must be fewer than --sample_steps")
    return args


def peak_of(device: torch.device, name: str, override: float | None) -> tuple[float | None, str]:
    if override is not None:
        return override, "--peak_tflops"
    found = peak_bf16_tflops(name) if device.type == "cuda" else None
    if found is None:
        return None, "unknown device: pass --peak_tflops for MFU"
    return found[0], f"{found[1]} data sheet, dense bf16"


def main(argv=None) -> dict:
    args = parse_args(argv)
    family = FAMILIES[args.family]
    device = torch.device(args.device)
    config = family.tiny_config if args.tiny else family.config
    checkpointing = not args.no_checkpointing
    compute_dtype = None if args.precision == "bf16-mixed" else "bfloat16"  # bf16-true: bf16 trained weights
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine())
    peak, peak_source = peak_of(device, name, args.peak_tflops)
    shift = scheduler_shift(family.scheduler())
    settings = method_settings(family, checkpointing)
    torch.manual_seed(0)

    roles = meta_roles = optimizers = None
    rows = []
    for phase in args.phases:
        method, method_phase = METHOD_PHASES[phase]
        if not isinstance(roles, method):  # this method's networks; the previous method's are freed first
            roles = optimizers = None
            free_memory(device)
            roles = build_roles(method, family, config, settings, device, compute_dtype)
            meta_roles = build_roles(method, family, config, settings, "meta", "bfloat16")
            optimizers = {name: torch.optim.AdamW([p for role in trained for p in getattr(roles, role).parameters()],
                                                  lr=1e-6, weight_decay=0.01)
                          for name, trained in roles.phases.items()}
        channels = roles.student.latent_channels
        optimizer = optimizers[method_phase]

        def measure(latent, warm_small: bool = True):
            inputs = make_inputs(roles.student, latent, args.text_len, shift, device)
            small = None
            if args.warmup_frames and warm_small:
                small_latent = latent_shape(args.batch_size, channels, args.warmup_frames, args.height, args.width)
                small = make_inputs(roles.student, small_latent, args.text_len, shift, device)
            return measure_phase(phase, roles, settings, optimizer, inputs, device, args.precision, args.warmup,
                                 args.steps, small)

        fitted = largest_that_fits(phase, measure, args, channels, list(optimizers.values()))
        if fitted is None:
            continue
        frames, latent, result = fitted
        if args.compile:  # the same size again, compiled (compiling in the warm-up steps)
            networks = [n for n in (roles.student, roles.teacher, getattr(roles, "fake_score", None)) if n is not None]
            for network in networks:
                network.compile_blocks()
            compiled = measure(latent, warm_small=False)  # compiled for the timed size
            for network in networks:  # the method's next phase is timed eager first
                network.eager_blocks()
            result["compiled_s_per_step"] = compiled["s_per_step"]
            result["compile_speedup"] = result["s_per_step"] / compiled["s_per_step"]
        meta_inputs = make_inputs(meta_roles.student, latent, args.text_len, shift, "meta")
        flops = count_phase_flops(phase, meta_roles, settings, meta_inputs, checkpointing)
        tflop = flops["model_flops"] / 1e12
        achieved = tflop / result["s_per_step"]
        rows.append({
            "phase": phase, "frames": frames, "height": args.height, "width": args.width,
            "latent": list(latent), "tokens_per_video": tokens_per_video(roles.student.patch_size, latent),
            **result, **flops, "model_tflop_per_step": tflop, "achieved_tflops": achieved,
            "mfu": achieved / peak if peak else None,
        })
        print(f"{phase}: {result['s_per_step']:.3f} s/step at {frames} frames", flush=True)

    sampling = None
    if args.sampling:
        roles = optimizers = None
        free_memory(device)
        sampling = measure_sampling(family, config, args, device, channels)
        print(f"sampling: teacher {sampling['teacher_s_per_video']:.2f} s/video "
              f"({sampling['teacher_s_per_video_from']}), student {sampling['student_s_per_video']:.3f} s/video ({sampling['speedup']:.1f}x)", flush=True)
    forward_latent = latent_shape(1, channels, args.frames, args.height, args.width)
    forward_inputs = make_inputs(meta_roles.student, forward_latent, args.text_len, shift, "meta")
    with torch.no_grad():
        counted = count_flops(lambda: meta_roles.student(forward_inputs.eps, forward_inputs.sigma, forward_inputs.cond))
    closed = family.closed_form(config, forward_latent, args.text_len) if family.closed_form else None
    report = {
        "family": family.name, "tiny": args.tiny,
        "device": name, "torch": torch.__version__, "diffusers": diffusers.__version__,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "model": f"tiny {family.model} (2 blocks)" if args.tiny else f"{family.model}, random weights",
        "params_per_network": sum(p.numel() for p in meta_roles.student.parameters()),
        "adapter_options": family.adapter_options,
        "precision": args.precision, "gradient_checkpointing": checkpointing,
        "batch_size": args.batch_size, "text_len": args.text_len, "text_dim": meta_roles.student.text_dim,
        "requested": {"frames": args.frames, "height": args.height, "width": args.width,
                      "latent": list(forward_latent),
                      "tokens_per_video": tokens_per_video(meta_roles.student.patch_size, forward_latent)},
        "peak_tflops": peak, "peak_source": peak_source,
        "forward_flops": {"counted": counted, "closed_form": closed},
        "warmup": args.warmup, "warmup_frames": args.warmup_frames, "steps": args.steps,
        "phases": rows, "sampling": sampling,
    }
    print_table(report)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return report


@torch.no_grad()
def measure_sampling(family: Family, config: dict, args, device: torch.device, channels: int) -> dict:
    """Seconds per video of the teacher's CFG sampler and of the one-step student (bf16)."""
    roles = build_roles(KDRoles, family, config, method_settings(family, False), device, "bfloat16")
    teacher, student = roles.teacher, roles.student.eval().requires_grad_(False)
    latent = latent_shape(1, channels, args.frames, args.height, args.width)
    d = make_inputs(teacher, latent, args.text_len, scheduler_shift(family.scheduler()), device)
    eps = d.eps.bfloat16()
    cond, uncond = d.cond.to(dtype=torch.bfloat16), d.uncond.to(dtype=torch.bfloat16)
    student_call = lambda: one_step_sample(velocity_fn(student, cond), eps)  # noqa: E731
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    student_times = time_steps(student_call, max(1, args.warmup), args.steps, device)
    guided = velocity_fn(teacher, cond, uncond, family.sample_guidance)

    def teacher_run(on_step=None):
        return sample_with_scheduler(guided, eps, family.scheduler(), args.sample_steps,
                                     step_sigma=teacher.sampler_sigma, on_step=on_step)

    if args.teacher_timed_steps:
        step_times = time_sampler_steps(teacher_run, args.teacher_warmup_steps, args.teacher_timed_steps, device)
        teacher_s = args.sample_steps * statistics.median(step_times)
        teacher_from = (f"{args.sample_steps} x median of {args.teacher_timed_steps} steps "
                        f"after {args.teacher_warmup_steps} warm-up")
    else:
        step_times = None
        teacher_s = time_steps(teacher_run, 0, 1, device)[0]
        teacher_from = "one whole video, timed"
    student_s = statistics.median(student_times)
    return {
        "frames": args.frames, "height": args.height, "width": args.width, "latent": list(latent),
        "scheduler": type(family.scheduler()).__name__,
        "teacher_steps": args.sample_steps, "teacher_nfe": 2 * args.sample_steps, "guidance": family.sample_guidance,
        "teacher_s_per_video": teacher_s, "teacher_s_per_video_from": teacher_from,
        "teacher_extrapolated": bool(args.teacher_timed_steps), "teacher_step_times": step_times,
        "student_s_per_video": student_s, "student_times": student_times,
        "speedup": teacher_s / student_s,
        "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
    }


def print_table(r: dict) -> None:
    fwd = r["forward_flops"]
    peak = f"{r['peak_tflops']:g} TFLOP/s ({r['peak_source']})" if r["peak_tflops"] else r["peak_source"]
    warm = f" at {r['warmup_frames']} frames" if r.get("warmup_frames") else ""
    print(f"\ndevice {r['device']} | torch {r['torch']} | diffusers {r['diffusers']} | {r['date']}")
    print(f"model {r['model']}, {r['params_per_network'] / 1e6:,.1f} M parameters per network | {r['precision']} | "
          f"gradient checkpointing {'on' if r['gradient_checkpointing'] else 'off'} | batch {r['batch_size']} | "
          f"text {r['text_len']} tokens | median of {r['steps']} steps after {r['warmup']}{warm}")
    print(f"bf16 peak {peak}")
    closed = "no closed form" if fwd["closed_form"] is None else f"{fwd['closed_form'] / 1e12:.4g} closed form"
    print(f"one forward at the requested size: {fwd['counted'] / 1e12:.4g} TFLOP counted, {closed}")
    head = ("phase", "video FxHxW", "latent CxTxHxW", "tokens", "s/step", "peak GiB",
            "TFLOP/step", "recompute", "TFLOP/s", "MFU")
    compiled = any("compiled_s_per_step" in p for p in r["phases"])
    if compiled:
        head = (*head, "compiled s/step", "eager/compiled")
    lines = [head]
    for p in r["phases"]:
        lines.append((
            p["phase"], f"{p['frames']}x{p['height']}x{p['width']}", "x".join(map(str, p["latent"][1:])),
            f"{p['tokens_per_video']:,}", f"{p['s_per_step']:.3f}",
            "n/a" if p["peak_gib"] is None else f"{p['peak_gib']:.1f}",
            f"{p['model_tflop_per_step']:.4g}", f"{p['recompute_flops'] / 1e12:.4g}",
            f"{p['achieved_tflops']:.4g}", "n/a" if p["mfu"] is None else f"{100 * p['mfu']:.1f}%",
            *((f"{p['compiled_s_per_step']:.3f}", f"{p['compile_speedup']:.2f}x") if compiled else ()),
        ))
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    for line in lines:
        print("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(line, widths))))
    print("TFLOP/step: model FLOPs (forward + backward, no recomputation); recompute: what checkpointing adds; "
          "MFU = TFLOP/step / s/step / peak. Discriminator head included; no gradient clipping.")
    if compiled:
        print("compiled: every block of student, teacher and fake score compiled (regional compilation), timed "
              "after the warm-up steps that compile them; eager/compiled > 1 means compiling pays")
    if r.get("sampling"):
        smp = r["sampling"]
        print(f"sampling {smp['frames']}x{smp['height']}x{smp['width']}: teacher {smp['teacher_steps']} steps CFG "
              f"({smp['teacher_nfe']} calls) {smp['teacher_s_per_video']:.2f} s/video "
              f"({smp['teacher_s_per_video_from']}), student 1 step "
              f"{smp['student_s_per_video']:.3f} s/video: {smp['speedup']:.1f}x")


if __name__ == "__main__":
    main(sys.argv[1:])
