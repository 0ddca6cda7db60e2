"""FSDP2 (``torch.distributed.fsdp.fully_shard``) for denoisers, and gathering them back.

Used by the stages' ``configure_model`` under :class:`distill_pl.training.strategies.FSDP2Strategy`
(Lightning's ``ModelParallelStrategy``): every transformer block (the denoiser's
``fsdp_units``) is its own FSDP unit, then the denoiser's root (patch embedding, condition
embedders, output head) is one more. Parameters
become ``DTensor`` shards on the data-parallel mesh; ``reshard_after_forward=True`` frees the
gathered weights after each forward, which also keeps optimizer toggling (``requires_grad``
flipped between the critic and the student phases of DMD2) correct.

With context parallelism (:mod:`distill_pl.models.context_parallel`) the mesh has the
dimensions ("data_parallel", "ring", "ulysses"): every network is sharded over all its processes
(the flattened mesh), the denoisers' split and gather hooks go on first, and the denoisers'
gradients are reduce-scattered as a sum over each context-parallel group (its ranks hold shares
of one pass's gradient) and a mean over the data-parallel ranks: FSDP2 sums over all processes
and divides by the data-parallel size only. Networks run on gathered outputs (the
discriminator head) hold the full gradient on every rank and keep FSDP2's mean over all processes.
"""

from __future__ import annotations

import contextlib
from typing import Iterable, Iterator

import torch
from torch import Tensor, nn
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from distill_pl.models.denoiser import Denoiser
from distill_pl.models.lora import lora_scale, merged_lora_state


def mixed_precision_policy(precision: str) -> MixedPrecisionPolicy | None:
    """bf16 compute for Lightning's ``bf16-mixed`` (all-gathered weights in bf16, gradients
    reduced in fp32, the sharded master weights stay fp32); None for any other precision."""
    if str(precision) in ("bf16-mixed", "bf16"):
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return None


def shard_module(module: nn.Module, mesh, mp_policy: MixedPrecisionPolicy | None = None) -> nn.Module:
    """``fully_shard`` a module as one unit (e.g. the discriminator head, or one block)."""
    kwargs = dict(mesh=mesh, reshard_after_forward=True)
    if mp_policy is not None:
        kwargs["mp_policy"] = mp_policy
    fully_shard(module, **kwargs)
    return module


def shard_denoiser(denoiser: Denoiser, mesh, mp_policy: MixedPrecisionPolicy | None = None,
                   gradient_divide_factor: int | None = None) -> nn.Module:
    """``fully_shard`` each of ``denoiser.fsdp_units`` (its blocks), then the denoiser itself;
    ``gradient_divide_factor``: what the reduce-scatter divides the summed gradients by (None:
    FSDP2's default, the mesh size: a mean); the reduction is then a plain sum followed by the
    division (gloo has no pre-multiplied sum, NCCL's zero-copy path wants a sum)."""
    units = [shard_module(block, mesh, mp_policy) for block in denoiser.fsdp_units]
    units.append(shard_module(denoiser, mesh, mp_policy))
    if gradient_divide_factor is not None:
        for unit in units:
            unit.set_gradient_divide_factor(float(gradient_divide_factor))
            unit.set_force_sum_reduction_for_comms(True)
    return denoiser


def shard_stage_networks(stage, denoisers: Iterable[nn.Module | None], others: Iterable[nn.Module] = ()) -> None:
    """A stage's ``configure_model`` under FSDP2: shard each denoiser per block and each of
    ``others`` whole, with bf16 compute when the trainer's precision is ``bf16-mixed``.
    Nothing under any other strategy, or when already sharded (``configure_model`` may run
    again). None entries (e.g. no EMA) are skipped.

    With the stage's ``context_parallel`` (a
    :class:`~distill_pl.models.context_parallel.ContextParallel`) the denoisers are first made
    context-parallel over their group, and their gradients reduced as the module docstring says;
    ValueError under any other strategy."""
    cp = getattr(stage, "context_parallel", None)
    mesh = sharding_mesh(stage)
    denoisers = [d for d in denoisers if d is not None]
    if cp is not None and mesh is None:
        raise ValueError("context_parallel needs --trainer.strategy distill_pl.training.strategies.FSDP2Strategy")
    if mesh is None or any(is_sharded(d) for d in denoisers):
        return
    policy = mixed_precision_policy(stage.trainer.precision)
    divide = None
    if cp is not None:
        from distill_pl.models.context_parallel import context_parallel_mesh, enable_context_parallel

        group = context_parallel_mesh(stage.device_mesh)
        for denoiser in denoisers:
            enable_context_parallel(denoiser, cp, group, stage.device)
        divide = stage.device_mesh["data_parallel"].size()
    for denoiser in denoisers:
        shard_denoiser(denoiser, mesh, policy, divide)
    for module in others:
        shard_module(module, mesh, policy)


def sharding_mesh(module) -> "object | None":
    """The mesh a LightningModule's networks are sharded over under ``ModelParallelStrategy``
    (None under any other strategy): its data-parallel mesh, or with context parallelism (a
    mesh with "ring" and "ulysses" dimensions) all its processes. Tensor parallelism is not
    implemented: its size must be 1."""
    mesh = getattr(module, "device_mesh", None)
    if mesh is None:
        return None
    if "ulysses" in (mesh.mesh_dim_names or ()):
        return mesh["data_parallel", "ring", "ulysses"]._flatten("data_context_parallel")
    if "tensor_parallel" in (mesh.mesh_dim_names or ()) and mesh["tensor_parallel"].size() != 1:
        raise ValueError(
            "distill_pl shards with FSDP2 only: use tensor_parallel_size=1 (distill_pl.training.strategies.FSDP2Strategy)"
        )
    return mesh["data_parallel"] if "data_parallel" in (mesh.mesh_dim_names or ()) else mesh


def is_sharded(module: nn.Module) -> bool:
    return isinstance(module, FSDPModule)


@contextlib.contextmanager
def gradient_sync(modules: Iterable[nn.Module], enabled: bool) -> Iterator[None]:
    """FSDP2's ``no_sync``: with ``enabled=False`` the backward inside accumulates unsharded
    gradients locally instead of reduce-scattering them; the next backward with sync enabled
    reduces the sum. Sharded modules only; others are left alone."""
    sharded = [m for m in modules if isinstance(m, FSDPModule)]
    for m in sharded:
        m.set_requires_gradient_sync(enabled)
    try:
        yield
    finally:
        for m in sharded:
            m.set_requires_gradient_sync(True)


def full_tensor(t: Tensor) -> Tensor:
    """A DTensor's full value (a collective: every rank must call); other tensors unchanged."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def gather_denoiser(denoiser: Denoiser, rank: int) -> Denoiser | None:
    """An unsharded CPU float copy of a sharded denoiser, on rank 0 (None on other ranks):
    :func:`plain_denoiser` of its :func:`gathered_state_dict` (a collective: every rank must
    call it). An unsharded ``denoiser`` is returned as it is, unless it has LoRA adapters: they
    are merged into the weights of a plain copy."""
    state = gathered_state_dict(denoiser, rank)
    return None if state is None else plain_denoiser(denoiser, state)


def gathered_state_dict(denoiser: Denoiser, rank: int) -> dict[str, Tensor] | None:
    """The full (unsharded) state dict of ``denoiser`` on rank 0, None on the other ranks. A
    collective when ``denoiser`` is sharded (every rank must call it): the full weights
    gathered to the CPU (``get_model_state_dict(..., full_state_dict=True, cpu_offload=True)``)."""
    if not is_sharded(denoiser):
        return denoiser.state_dict() if rank == 0 else None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(denoiser, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return full if rank == 0 else None


def plain_denoiser(denoiser: Denoiser, state: dict[str, Tensor]) -> Denoiser:
    """``denoiser`` as a plain unsharded network, given its full ``state`` (see
    :func:`gathered_state_dict`): ``denoiser`` itself when it is unsharded and has no LoRA
    adapters, else its ``empty_copy()`` holding ``state`` with any adapters merged into the
    weights (:func:`~distill_pl.models.lora.merged_lora_state`)."""
    scale = lora_scale(denoiser)
    if scale is None and not is_sharded(denoiser):
        return denoiser
    return denoiser_from_state_dict(denoiser, merged_lora_state(state, scale))


def denoiser_from_state_dict(like: Denoiser, state: dict[str, Tensor]) -> Denoiser:
    """A denoiser of ``like``'s architecture (``like.empty_copy()``: its class, config and
    adapter options; ``like`` may be sharded or on meta) holding ``state``, built without
    initialising random weights. ``strict`` loading: a missing or extra key is an error."""
    copy = like.empty_copy()
    copy.load_state_dict(state, strict=True, assign=True)
    return copy
