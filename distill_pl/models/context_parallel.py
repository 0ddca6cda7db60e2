"""Context parallelism for denoisers: one forward pass split over the tokens of a process group.

Built on diffusers' engine (``ContextParallelConfig`` and the hooks of a backbone's context-
parallel plan, ``_cp_plan``). A context-parallel (CP) group of ``ulysses * ring`` processes runs
each denoiser call together, on the same inputs: the plan's hooks split the token sequence over
the group after the patch embedding (and the rotary embedding with it), the self-attention
exchanges what it needs (Ulysses: an all-to-all from a split over tokens to a split over heads
and back; ring: key/value blocks passed around the ring, merged by their log-sum-exp), and the
output projection's tokens are all-gathered, so every rank of the group returns the full
velocity. Cross-attention to the text needs no exchange (each rank's queries see all text keys).

Gradients: the all-gather's backward keeps each rank's own tokens, so a rank's parameter
gradients of a denoiser are its tokens' share and the SUM over the CP group is the gradient of
the whole pass. A network run after a gather (the discriminator head on gathered block features)
gets the full gradient on every rank instead. :func:`distill_pl.models.sharding.shard_stage_networks`
reduces the two kinds accordingly.

The setting is ``context_parallel: {ulysses: N, ring: M}`` on a stage (N x M processes per
group; the data-parallel size is the process count divided by N x M). Ring attention needs an
attention kernel that returns the log-sum-exp, which diffusers' native (SDPA) backend does not:
ring runs on CUDA with the cuDNN SDPA backend (``_native_cudnn``), Ulysses on any device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

#: the keys of the ``context_parallel`` setting
SETTING_KEYS = ("ulysses", "ring")
#: diffusers' attention backend of ring attention (returns the log-sum-exp ring merging needs)
RING_ATTENTION_BACKEND = "_native_cudnn"


@dataclass(frozen=True)
class ContextParallel:
    """``ulysses`` x ``ring`` processes split each denoiser pass (both >= 1, product > 1)."""

    ulysses: int = 1
    ring: int = 1

    @property
    def size(self) -> int:
        """Processes in one context-parallel group."""
        return self.ulysses * self.ring

    @classmethod
    def from_setting(cls, setting: dict | None) -> "ContextParallel | None":
        """The ``context_parallel`` setting ({ulysses: N, ring: M}, each default 1) or None
        for none (None, {} or both 1). ValueError (one line) for other keys or values."""
        if not setting:
            return None
        if not isinstance(setting, dict) or set(setting) - set(SETTING_KEYS):
            raise ValueError(f"context_parallel must be a mapping with keys {list(SETTING_KEYS)}, got {setting!r}")
        values = {k: setting.get(k, 1) for k in SETTING_KEYS}
        for key, value in values.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"context_parallel.{key} must be an integer >= 1, got {value!r}")
        cp = cls(**values)
        return cp if cp.size > 1 else None


def check_context_parallel(denoiser: nn.Module, cp: ContextParallel) -> None:
    """ValueError (one line) unless ``denoiser`` can run under ``cp``: its family declares a
    context-parallel plan (:attr:`~distill_pl.models.denoiser.Denoiser.context_parallel_plans`)
    and ``cp.ulysses`` divides the attention head count of every planned backbone (Ulysses splits
    the heads)."""
    plans = denoiser.context_parallel_plans
    name = type(denoiser).__name__
    if not plans:
        raise ValueError(f"context_parallel: {name} declares no context-parallel plan (its family does not support it)")
    for attr in plans:
        heads = denoiser.get_submodule(attr).config.num_attention_heads
        if heads % cp.ulysses:
            raise ValueError(f"context_parallel.ulysses={cp.ulysses} must divide the {heads} attention heads of {name}")


def context_parallel_mesh(mesh):
    """The ("ring", "ulysses") part of a stage's device mesh (see
    :class:`distill_pl.training.strategies.FSDP2Strategy`): one CP group per data-parallel rank."""
    return mesh["ring", "ulysses"]


def enable_context_parallel(denoiser: nn.Module, cp: ContextParallel, mesh, device: torch.device) -> None:
    """Make ``denoiser`` run each forward with its CP group (``mesh``: a device mesh with "ring"
    and "ulysses" dimensions of sizes ``cp.ring`` and ``cp.ulysses``, each rank's group).

    What diffusers' ``ModelMixin.enable_parallelism`` does, with the device given (diffusers
    derives it from ``torch.accelerator.device_count()``, zero on a CPU-only machine): set up a
    ``ParallelConfig`` on the mesh, hand it to every attention processor, register the plan's
    split and gather hooks. Ring needs CUDA (see the module docstring). Once per denoiser."""
    from diffusers.hooks.context_parallel import apply_context_parallel
    from diffusers.models._modeling_parallel import ContextParallelConfig, ParallelConfig

    check_context_parallel(denoiser, cp)
    if cp.ring > 1 and device.type != "cuda":
        raise ValueError(f"context_parallel.ring={cp.ring} needs CUDA (ring attention needs the attention's "
                         f"log-sum-exp, which diffusers' {device.type} attention does not return); use ulysses")
    config = ParallelConfig(context_parallel_config=ContextParallelConfig(
        ring_degree=cp.ring, ulysses_degree=cp.ulysses, mesh=mesh))
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    config.setup(rank, world, device, mesh=mesh)
    for attr, plan in denoiser.context_parallel_plans.items():
        backbone = denoiser.get_submodule(attr)
        if backbone._parallel_config is not None:
            raise RuntimeError(f"context parallel is already enabled on {type(denoiser).__name__}.{attr}")
        if cp.ring > 1:
            backbone.set_attention_backend(RING_ATTENTION_BACKEND)
        for module in backbone.modules():
            processor = getattr(module, "processor", None)
            if processor is not None and hasattr(processor, "_parallel_config"):
                processor._parallel_config = config
        apply_context_parallel(backbone, config.context_parallel_config, plan)
        backbone._parallel_config = config
    denoiser.context_parallel_group = config.context_parallel_config._flattened_mesh


def gather_tokens(tokens: Tensor, group_mesh) -> Tensor:
    """[B, N / size, D] tokens of each rank of a CP group -> the group's [B, N, D] (rank order),
    with diffusers' all-gather whose backward keeps each rank's own tokens' gradient."""
    from diffusers.hooks.context_parallel import EquipartitionSharder

    return EquipartitionSharder.unshard(tokens, 1, group_mesh)


def stage_context_parallel(setting: dict | None, denoiser: nn.Module) -> ContextParallel | None:
    """A stage's ``context_parallel`` setting, checked against its ``denoiser`` (the student:
    all of a stage's networks share its architecture); None when off."""
    cp = ContextParallel.from_setting(setting)
    if cp is not None:
        check_context_parallel(denoiser, cp)
    return cp
