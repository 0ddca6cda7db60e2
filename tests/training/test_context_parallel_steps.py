"""Context parallel (Ulysses, 2 gloo CPU processes) == one process, for the steps of KD and DMD2.

Each of 2 processes builds the same tiny Wan roles (random weights, gradient checkpointing on),
computes a phase's loss and gradients without any parallelism (the reference), then the same
phase with the roles made context-parallel and sharded exactly as a stage's ``configure_model``
does under ``FSDP2Strategy`` (``shard_stage_networks`` on a (data_parallel 1, ring 1, ulysses 2)
mesh): both ranks' losses equal the reference's, and the full (gathered) gradients of the
phase's trained networks equal the reference gradients. Tolerance: rtol 1e-5, atol 1e-6
(float32; the split changes only the order of the sums).

Ring attention is not run here: diffusers' CPU attention does not return the log-sum-exp that
ring attention merges with (the GPU report runs it). Slow: deselected by default.
"""

from __future__ import annotations

import copy
import os
import socket
from types import SimpleNamespace

import pytest
import torch

pytestmark = pytest.mark.slow

#: 3 latent + 3 control channels, 2 heads x 8, patches (1, 2, 2), 3 blocks
TINY = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=6, out_channels=3,
            text_dim=16, freq_dim=16, ffn_dim=32, num_layers=3)
#: latents [B, C, T, H, W]: 2 x 4 x 4 = 32 tokens, split 16 + 16
SHAPE = (2, 3, 2, 8, 8)
KD_SETTINGS = dict(teacher_dtype="float32", gradient_checkpointing=True, ema_decay=None)
DMD2_SETTINGS = dict(
    teacher_dtype="float32", gradient_checkpointing=True, fake_score_lora_rank=None, feature_block=1,
    discriminator_hidden=8, ema_decay=None, seed=0, guidance=3.0, gan_weight=0.5, critic_gan_weight=1.0,
    discriminator_on="fake_score", trained_step_input="backward_simulation", phased_dmd=False, t_min=0.02,
    t_max=0.98,
)

#: (method, phase) pairs checked, each on freshly built roles
PHASES = (("kd", "KD step"), ("dmd2", "critic"), ("dmd2", "generator"))


def build_roles(method: str):
    from distill_pl.methods.dmd2 import DMD2Roles
    from distill_pl.methods.kd import KDRoles
    from distill_pl.methods.roles import config_denoisers

    torch.manual_seed(0)
    make = config_denoisers("WanTransformer3DModel", TINY)
    if method == "kd":
        return KDRoles.from_settings(KD_SETTINGS, make), KD_SETTINGS
    return DMD2Roles.from_settings(DMD2_SETTINGS, make), DMD2_SETTINGS


def phase_loss(roles, settings, phase: str) -> torch.Tensor:
    """The phase's loss on inputs drawn from a fixed seed, with only its trained roles trainable
    (as the stage's optimizer toggling leaves them)."""
    from distill_pl.models.conditioning import Conditioning

    g = torch.Generator().manual_seed(1)
    latents = lambda: torch.randn(SHAPE, generator=g)  # noqa: E731
    cond = Conditioning(torch.randn(SHAPE[0], 5, TINY["text_dim"], generator=g),
                        torch.tensor([[True] * 5, [True] * 3 + [False] * 2]), latents())
    sigma = torch.tensor([0.3, 0.8])
    trained = roles.phases[phase]
    for name, network in roles.networks().items():
        if network is not None and name != "teacher":
            network.requires_grad_(name in trained)
    loss = roles.phase_losses(settings, latents, sigma, cond)[phase]()
    return loss[0] if isinstance(loss, tuple) else loss


def gradients(roles, phase: str) -> dict[str, torch.Tensor]:
    from distill_pl.models.sharding import full_tensor

    return {f"{name}.{key}": full_tensor(p.grad).detach().clone()
            for name in roles.phases[phase] for key, p in getattr(roles, name).named_parameters()
            if p.grad is not None}


def worker(rank: int, port: int) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from distill_pl.models.context_parallel import ContextParallel
    from distill_pl.models.sharding import shard_stage_networks

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    try:
        mesh = init_device_mesh("cpu", (1, 1, 2), mesh_dim_names=("data_parallel", "ring", "ulysses"))
        stage = SimpleNamespace(context_parallel=ContextParallel(ulysses=2), device_mesh=mesh,
                                trainer=SimpleNamespace(precision="32-true"), device=torch.device("cpu"))
        for method, phase in PHASES:
            roles, settings = build_roles(method)
            split = copy.deepcopy(roles)
            reference_loss = phase_loss(roles, settings, phase)
            reference_loss.backward()
            reference = gradients(roles, phase)

            denoisers = [split.student, split.teacher] + ([split.fake_score] if method == "dmd2" else [])
            shard_stage_networks(stage, denoisers, [split.discriminator] if method == "dmd2" else [])
            loss = phase_loss(split, settings, phase)
            loss.backward()
            torch.testing.assert_close(loss.detach(), reference_loss.detach(), rtol=1e-5, atol=1e-6,
                                       msg=f"{method} {phase} loss")
            grads = gradients(split, phase)
            assert grads.keys() == reference.keys() and len(grads) > 0
            for key, value in reference.items():
                torch.testing.assert_close(grads[key], value, rtol=1e-5, atol=1e-6, msg=f"{method} {phase} {key}")
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ulysses_over_two_processes_gives_the_losses_and_gradients_of_one():
    """KD step, DMD2 critic step (fake score + discriminator head on the gathered features of
    block 1) and DMD2 generator step (teacher with CFG and fake score without gradient, the GAN
    term through the fake score's features) under Ulysses 2 with FSDP2 over both processes."""
    torch.multiprocessing.spawn(worker, args=(free_port(),), nprocs=2, join=True)
