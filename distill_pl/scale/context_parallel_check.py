"""Context parallel against one process, phase by phase: the check behind the CP test and the
GPU report's CP rows (``scripts/check_context_parallel.py``).

Every one of ``data_parallel`` x ``cp.size`` processes (gloo, all on ``device``; data-parallel
rank ``d`` = rank // ``cp.size``, the batch of ``d`` drawn from seed ``1 + d``) builds the same
roles (random weights from a transformer config) and computes, without any parallelism, each
phase's loss on every data-parallel batch and the gradients of the networks the phase trains of
their mean (the reference), then the phase on its own batch with the roles split as a stage
splits them: with ``sharding="fsdp"`` through
:func:`~distill_pl.models.sharding.shard_stage_networks` on a (data_parallel, ring, ulysses)
mesh, exactly as ``configure_model`` under ``FSDP2Strategy``; with ``"none"`` (one group only)
the context-parallel hooks alone, the denoisers' gradients then summed over the group by hand.
It reports per phase: the reference loss of its batch and the split loss, the relative L2 error
``||g_split - g_ref|| / ||g_ref||`` of each trained network's gradient, the peak device memory
and the seconds of the reference (all batches) and of the split step (forward + backward, one
call each, after nothing: the first call includes warm-up).
"""

from __future__ import annotations

import copy
import inspect
import json
import os
import socket
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from distill_pl.models.context_parallel import ContextParallel

#: (method, phase) pairs checked, each on freshly built roles
PHASES = (("kd", "KD step"), ("dmd2", "critic"), ("dmd2", "generator"))
#: overrides of the stages' own defaults (every other setting is the ``__init__`` default)
KD_OVERRIDES = dict(teacher_dtype="float32", gradient_checkpointing=True, ema_decay=None)
DMD2_OVERRIDES = dict(
    teacher_dtype="float32", gradient_checkpointing=True, fake_score_lora_rank=None, feature_block=1,
    discriminator_hidden=8, ema_decay=None, seed=0, guidance=3.0, gan_weight=0.5, critic_gan_weight=1.0,
    discriminator_on="fake_score", trained_step_input="backward_simulation", phased_dmd=False, t_min=0.02,
    t_max=0.98,
)


def stage_settings(method: str) -> dict:
    """The settings of ``method``'s stage module (``KDModule`` or ``DMD2Module``) as a run without
    those keys in its config has them: its ``__init__`` defaults, then the overrides above."""
    from distill_pl.training.dmd2 import DMD2Module
    from distill_pl.training.kd import KDModule

    module, overrides = (KDModule, KD_OVERRIDES) if method == "kd" else (DMD2Module, DMD2_OVERRIDES)
    parameters = inspect.signature(module.__init__).parameters.values()
    defaults = {p.name: p.default for p in parameters if p.default is not inspect.Parameter.empty}
    return defaults | overrides


def build_roles(method: str, class_name: str, config: dict, compute_dtype: str | None):
    """The method's roles (KD or DMD2 settings above) from seed 0, on the current device."""
    from distill_pl.methods.dmd2 import DMD2Roles
    from distill_pl.methods.kd import KDRoles
    from distill_pl.methods.roles import config_denoisers

    torch.manual_seed(0)
    make = config_denoisers(class_name, config)
    settings = stage_settings(method)
    roles_class = KDRoles if method == "kd" else DMD2Roles
    return roles_class.from_settings(settings, make, compute_dtype), settings


def phase_loss(roles, settings: dict, phase: str, shape: tuple[int, ...], text: tuple[int, int],
               control_channels: int, device: torch.device, seed: int = 1) -> torch.Tensor:
    """The phase's loss on inputs drawn from ``seed`` (latents of ``shape`` [B, C, T, H, W], text
    [B, L, D] for ``text`` = (L, D) with the last two tokens of sample 1 masked, a control of
    ``control_channels``; for a model that takes conditional frames, drawn ``cond_latents`` of
    which sample 0 gives its first latent frame and sample 1 none, so the per-frame timesteps
    and condition masks differ within a video), with only the phase's trained roles trainable
    (as the stage's optimizer toggling leaves them)."""
    from distill_pl.models.conditioning import Conditioning

    g = torch.Generator().manual_seed(seed)
    dtype = next(roles.student.parameters()).dtype
    draw = lambda size: torch.randn(size, generator=g).to(device, dtype)  # noqa: E731
    mask = torch.ones(shape[0], text[0], dtype=torch.bool)
    mask[1:, -2:] = False
    control = draw((shape[0], control_channels, *shape[2:])) if control_channels else None
    cond = Conditioning(draw((shape[0], *text)), mask.to(device), control)
    if roles.student.takes_conditional_frames:
        cond = cond.with_conditional_frames(draw(shape), torch.tensor([1, 0][: shape[0]], device=device))
    trained = roles.phases[phase]
    for name, network in roles.networks().items():
        if network is not None and name != "teacher":
            network.requires_grad_(name in trained)
    loss = roles.phase_losses(settings, lambda: draw(shape), torch.tensor([0.3, 0.8][: shape[0]], device=device),
                              cond)[phase]()
    return loss[0] if isinstance(loss, tuple) else loss


def gradients(roles, phase: str) -> dict[str, list[torch.Tensor]]:
    """Trained role -> the full gradients of its parameters (gathered when sharded), float32."""
    from distill_pl.models.sharding import full_tensor

    return {name: [full_tensor(p.grad).detach().float() for p in getattr(roles, name).parameters()
                   if p.grad is not None] for name in roles.phases[phase]}


def relative_error(split: list[torch.Tensor], reference: list[torch.Tensor]) -> float:
    """``||split - reference|| / ||reference||`` over all tensors of a network."""
    diff = torch.stack([(a - b).norm() for a, b in zip(split, reference, strict=True)]).norm()
    return float(diff / torch.stack([b.norm() for b in reference]).norm())


def timed(fn, device: torch.device) -> tuple[float, float | None]:
    """(seconds, peak GiB of device memory; None on the CPU) of one ``fn()``."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return time.perf_counter() - start, torch.cuda.max_memory_allocated(device) / 2**30
    return time.perf_counter() - start, None


def split_roles(roles, method: str, cp: ContextParallel, data_parallel: int, sharding: str,
                device: torch.device) -> None:
    """Make ``roles`` context-parallel on a (data_parallel, ring, ulysses) mesh, sharded or not."""
    from torch.distributed.device_mesh import init_device_mesh

    from distill_pl.models.context_parallel import context_parallel_mesh, enable_context_parallel
    from distill_pl.models.sharding import shard_stage_networks

    mesh = init_device_mesh(device.type, (data_parallel, cp.ring, cp.ulysses),
                            mesh_dim_names=("data_parallel", "ring", "ulysses"))
    denoisers = [roles.student, roles.teacher] + ([roles.fake_score] if method == "dmd2" else [])
    if sharding == "fsdp":
        stage = SimpleNamespace(context_parallel=cp, device_mesh=mesh, trainer=SimpleNamespace(precision="32-true"),
                                device=device)
        shard_stage_networks(stage, denoisers, [roles.discriminator] if method == "dmd2" else [])
    else:
        for denoiser in denoisers:
            enable_context_parallel(denoiser, cp, context_parallel_mesh(mesh), device)


def sum_denoiser_gradients(roles, phase: str) -> None:
    """Unsharded split: the sum over the group of each trained denoiser's gradient (the
    discriminator head's is already the full one on every rank)."""
    for name in roles.phases[phase]:
        if name != "discriminator":
            for p in getattr(roles, name).parameters():
                if p.grad is not None:
                    torch.distributed.all_reduce(p.grad)


def check_phases(cp: ContextParallel, class_name: str, config: dict, shape: tuple[int, ...], text: tuple[int, int],
                 device: torch.device, sharding: str = "fsdp", compute_dtype: str | None = None,
                 data_parallel: int = 1) -> list[dict]:
    """The rows described in the module docstring, one per phase of :data:`PHASES` (collective:
    every process of the initialised group calls it)."""
    if sharding != "fsdp" and data_parallel != 1:
        raise ValueError("the unsharded check runs one context-parallel group (data_parallel 1)")
    own = torch.distributed.get_rank() // cp.size
    rows = []
    for method, phase in PHASES:
        roles, settings = build_roles(method, class_name, config, compute_dtype)
        roles.to(device)
        split = copy.deepcopy(roles)
        control = roles.student.control_channels

        def step(r, d: int, weight: float = 1.0):
            loss = phase_loss(r, settings, phase, shape, text, control, device, seed=1 + d)
            (weight * loss).backward()
            return loss.detach().float()

        holder = {}
        reference_s, reference_gib = timed(lambda: holder.update(
            loss=[step(roles, d, 1 / data_parallel) for d in range(data_parallel)][own]), device)
        reference = gradients(roles, phase)
        del roles
        split_roles(split, method, cp, data_parallel, sharding, device)
        split_s, split_gib = timed(lambda: holder.update(split=step(split, own)), device)
        if sharding != "fsdp":
            sum_denoiser_gradients(split, phase)
        grads = gradients(split, phase)
        rows.append(dict(
            method=method, phase=phase, data_parallel=data_parallel, ulysses=cp.ulysses, ring=cp.ring,
            sharding=sharding,
            loss_reference=float(holder["loss"]), loss_split=float(holder["split"]),
            gradient_relative_error={name: relative_error(grads[name], reference[name]) for name in reference},
            seconds_reference=reference_s, seconds_split=split_s,
            peak_gib_reference=reference_gib, peak_gib_split=split_gib,
        ))
    return rows


def _worker(rank: int, port: int, cases: list[dict], out: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size(cases[0]))
    device = cases[0]["device"]
    if device.type == "cpu":
        torch.set_num_threads(1)
    else:  # every process on the one device given (device meshes would otherwise pick rank % count)
        torch.cuda.set_device(device.index or 0)
    try:
        rows = [dict(class_name=case["class_name"], **row) for case in cases for row in check_phases(**case)]
        if rank == 0:
            Path(out).write_text(json.dumps(rows, indent=1))
    finally:
        dist.destroy_process_group()


def world_size(case: dict) -> int:
    """Processes of a case: its data-parallel size x its context-parallel group size."""
    return case.get("data_parallel", 1) * case["cp"].size


def run_check(out: str | Path, cases: list[dict]) -> list[dict]:
    """:func:`check_phases` of each of ``cases`` (its keyword arguments; one world size and
    device for all) on that many new gloo processes (all on ``device``: on CUDA they share the
    one GPU, so the split seconds are not a speed-up measurement); rank 0's rows, each with its
    case's ``class_name``, are written to ``out`` (JSON) and returned."""
    if len({(world_size(case), case["device"]) for case in cases}) != 1:
        raise ValueError("run_check: every case needs the same world size and device")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_worker, args=(port, cases, str(out)), nprocs=world_size(cases[0]), join=True)
    return json.loads(Path(out).read_text())
