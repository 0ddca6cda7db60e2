"""One rank's share of a context-parallel denoiser pass, on meta tensors, for ``estimate-memory``.

Under context parallelism (:mod:`distill_pl.models.context_parallel`) every rank of a group of
``P = ulysses * ring`` processes runs each denoiser pass on ``1 / P`` of the tokens: the
family's plan (``Denoiser.context_parallel_plans``, diffusers' ``_cp_plan`` format) splits the
listed inputs and outputs along their token dimension and all-gathers the listed outputs back
to full size. :func:`simulated_sequence_split` registers the same plan on a denoiser built on
the meta device with stand-ins for the collectives, so that a meta forward saves for backward
what one rank's forward saves:

- a split keeps the first ``1 / P`` of the tokens (``narrow``: a view, as diffusers' ``chunk``);
- an all-gather returns a new full-size tensor (``cat`` of ``P`` copies; like the all-gather,
  it saves nothing for backward), the plan's gathered output and the discriminator's gathered
  block features alike;
- the attention runs on the rank's ``N / P`` queries with all heads and its own keys: the
  bytes it saves (q, k, v, output, log-sum-exp) equal Ulysses' ``N`` tokens with ``H / P`` heads
  after its all-to-all, and ring attention's own-rank blocks.

What the exchanges hold while one attention call runs is not saved and is counted apart
(:func:`exchange_buffer_bytes`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterable, Iterator

import torch
from diffusers.hooks.context_parallel import ContextParallelOutput, ContextParallelSplitHook, _get_submodule_by_name
from diffusers.hooks.hooks import HookRegistry, ModelHook
from torch import Tensor, nn

from distill_pl.models import context_parallel
from distill_pl.models.context_parallel import ContextParallel


@dataclass(frozen=True)
class SimulatedGroup:
    """Stands for a context-parallel group's device mesh where only its size is read
    (``Denoiser.check_inputs``: the token count must be a multiple of it)."""

    processes: int

    def size(self) -> int:
        return self.processes


def gather_copies(tensor: Tensor, dim: int, processes: int) -> Tensor:
    """The shape and storage of an all-gather of ``tensor`` along ``dim`` over ``processes``
    ranks: a new tensor ``processes`` times as long there (the values are not the gather's)."""
    return torch.cat([tensor] * processes, dim=dim)


class _SplitHook(ContextParallelSplitHook):
    """diffusers' split hook (which inputs or outputs, by name or position) keeping the first
    ``1 / processes`` along the split dimension instead of the rank's chunk."""

    def __init__(self, metadata: dict, processes: int) -> None:
        super().__init__(metadata, parallel_config=None)
        self.processes = processes

    def _prepare_cp_input(self, x: Tensor, cp_input) -> Tensor:
        if cp_input.expected_dims is not None and x.dim() != cp_input.expected_dims:
            return x  # diffusers leaves such an input whole too
        return x.narrow(cp_input.split_dim, 0, x.shape[cp_input.split_dim] // self.processes)


class _GatherHook(ModelHook):
    """The plan's gathered outputs (one spec or None per output) at full size (:func:`gather_copies`)."""

    def __init__(self, outputs: list, processes: int) -> None:
        super().__init__()
        self.outputs, self.processes = outputs, processes

    def post_forward(self, module: nn.Module, output):
        single = isinstance(output, Tensor)
        values = [output] if single else list(output)
        for index, spec in enumerate(self.outputs):
            if spec is not None:
                values[index] = gather_copies(values[index], spec.gather_dim, self.processes)
        return values[0] if single else tuple(values)


def _register_plan(backbone: nn.Module, plan: dict, processes: int) -> None:
    """Register ``plan`` (diffusers' ``_cp_plan`` format) on ``backbone`` as
    ``apply_context_parallel`` does, with the hooks above."""
    for module_id, spec in plan.items():
        modules = _get_submodule_by_name(backbone, module_id)
        for module in modules if isinstance(modules, list) else [modules]:
            if isinstance(spec, dict):
                hook, name = _SplitHook(spec, processes), f"cp_input---{module_id}"
            else:
                outputs = [spec] if isinstance(spec, ContextParallelOutput) else list(spec)
                hook, name = _GatherHook(outputs, processes), f"cp_output---{module_id}"
            HookRegistry.check_if_exists_or_initialize(module).register_hook(hook, name)


@contextlib.contextmanager
def simulated_sequence_split(denoisers: Iterable[nn.Module], cp: ContextParallel) -> Iterator[None]:
    """Make each denoiser (built for the estimate, on meta, never used for anything else) run
    as one rank of a ``cp`` group: the plan's hooks registered for good, the group set while the
    context is open, and the discriminator features' all-gather
    (``context_parallel.gather_tokens``) replaced by :func:`gather_copies`."""
    denoisers = list(denoisers)
    for denoiser in denoisers:
        for attr, plan in denoiser.context_parallel_plans.items():
            _register_plan(denoiser.get_submodule(attr), plan, cp.size)
        denoiser.context_parallel_group = SimulatedGroup(cp.size)
    gather_tokens = context_parallel.gather_tokens
    context_parallel.gather_tokens = lambda tokens, group: gather_copies(tokens, 1, group.size())
    try:
        yield
    finally:
        context_parallel.gather_tokens = gather_tokens
        for denoiser in denoisers:
            denoiser.context_parallel_group = None


def exchange_buffer_bytes(cp: ContextParallel, query_elements: int, element_size: int) -> int:
    """Bytes the exchanges of one self-attention call hold on a rank while it runs (freed when
    it returns, so counted once, on top of the saved activations). ``query_elements``: the
    rank's query, ``B * N / P * heads * head_dim`` (the largest of the meta pass), in values of
    ``element_size`` bytes:

    - Ulysses: the all-to-all of q, k and v (and of the output back) writes each into a new
      buffer of the rank's size beside a contiguous copy of its input: six such buffers for
      the three inputs in flight;
    - ring: diffusers copies the rank's keys and values into one buffer and all-gathers the
      whole ring's at once (``2 * (ring + 1)`` buffers of the rank's size: after a Ulysses
      exchange a rank's keys have ``N / ring`` tokens of ``heads / ulysses`` heads, as many
      values as its query), and merges the blocks' outputs in float32 (two outputs).
    """
    ulysses = 6 * query_elements * element_size if cp.ulysses > 1 else 0
    ring = (2 * (cp.ring + 1) * query_elements * element_size + 2 * 4 * query_elements) if cp.ring > 1 else 0
    return ulysses + ring
