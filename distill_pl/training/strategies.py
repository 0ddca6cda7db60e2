"""Lightning strategies for distill_pl: FSDP2 sharding on ``ModelParallelStrategy``.

``--trainer.strategy distill_pl.training.strategies.FSDP2Strategy`` shards every network of the KD and
DMD2 stages per transformer block over all processes (their ``configure_model`` hooks apply
``fully_shard``, see :mod:`distill_pl.models.sharding`) and saves distributed checkpoints (a
folder per checkpoint, one shard file per rank). It runs on GPUs (NCCL) and on CPUs (gloo).

A distributed checkpoint is written into a staging folder beside the final one
(``.<name>.partial``); when every rank has written its shard, rank 0 fsyncs the files and
swaps the staging folder in (the old folder is first renamed to ``.<name>.old``, then
removed). A run killed during the save leaves the previous checkpoint or the new one under
the final name (or, between the two renames, none: resuming then falls back to the newest
intact checkpoint, see :mod:`distill_pl.training.resume`), never a mixture of shards of two steps.

Context parallelism: when the LightningModule has a ``context_parallel`` setting
(:class:`~distill_pl.models.context_parallel.ContextParallel`, ``ulysses * ring`` processes per
group), the device mesh is ("data_parallel", "ring", "ulysses") of sizes (processes / group
size, ring, ulysses): consecutive ranks form a group, and Lightning's samplers, which split the
data by the "data_parallel" dimension, give every rank of a group the same batches.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from lightning.fabric.strategies.model_parallel import _is_sharded_checkpoint
from lightning.fabric.utilities.load import _METADATA_FILENAME
from lightning.pytorch.strategies import ModelParallelStrategy


class FSDP2Strategy(ModelParallelStrategy):
    """``ModelParallelStrategy`` with pure data parallelism by default
    (``data_parallel_size`` = all processes of all nodes, ``tensor_parallel_size`` = 1), and
    frozen networks left out of distributed checkpoints.

    The LightningModule names its frozen submodules in ``frozen_prefixes`` (e.g.
    ``("teacher.", "autoencoder.")``): their keys are not saved, and on resume only the other
    keys are read from the checkpoint (every one of them must be there). The loaded weights are
    also handed to ``on_load_checkpoint`` as ``checkpoint["state_dict"]``, so the modules'
    checks of what a checkpoint holds work as with a single-file checkpoint.
    """

    def __init__(self, data_parallel_size: int | str = "auto", tensor_parallel_size: int | str = 1, **kwargs) -> None:
        super().__init__(data_parallel_size=data_parallel_size, tensor_parallel_size=tensor_parallel_size, **kwargs)

    def setup_environment(self) -> None:
        cp = getattr(self.lightning_module, "context_parallel", None)
        if cp is not None:
            return self._setup_context_parallel_environment(cp)
        if self._data_parallel_size == "auto":
            tp = 1 if self._tensor_parallel_size == "auto" else int(self._tensor_parallel_size)
            self._data_parallel_size = self.num_nodes * self.num_processes // tp
        super().setup_environment()

    def _setup_context_parallel_environment(self, cp) -> None:
        """``ModelParallelStrategy.setup_environment`` with the (data_parallel, ring, ulysses)
        mesh of the module's ``context_parallel`` setting (see the module docstring)."""
        from torch.distributed.device_mesh import init_device_mesh

        world = self.num_nodes * self.num_processes
        if world % cp.size or self._tensor_parallel_size not in (1, "auto"):
            raise ValueError(f"context_parallel ulysses={cp.ulysses} x ring={cp.ring} needs a multiple of "
                             f"{cp.size} processes (got {world}) and tensor_parallel_size 1")
        data_parallel = world // cp.size
        if self._data_parallel_size not in ("auto", data_parallel):
            raise ValueError(f"data_parallel_size={self._data_parallel_size}: with context_parallel of "
                             f"{cp.size} processes on {world} it is {data_parallel}")
        self._data_parallel_size, self._tensor_parallel_size = data_parallel, 1
        super(ModelParallelStrategy, self).setup_environment()
        self._setup_distributed()
        self._device_mesh = init_device_mesh(self.root_device.type, (data_parallel, cp.ring, cp.ulysses),
                                             mesh_dim_names=("data_parallel", "ring", "ulysses"))
        self.lightning_module._device_mesh = self._device_mesh

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath, storage_options: Any | None = None) -> None:
        """Lightning's save, through a staging folder when the checkpoint is distributed (see
        the module docstring); a single-file checkpoint goes through the ``CheckpointIO``."""
        if not self._save_distributed_checkpoint:
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        path = Path(self.broadcast(filepath))
        staging = path.with_name(f".{path.name}.partial")
        if self.global_rank == 0 and staging.exists():
            shutil.rmtree(staging)  # left by a killed save
        self.barrier("distill_pl_checkpoint_staging")
        super().save_checkpoint(checkpoint, staging, storage_options)
        self.barrier("distill_pl_checkpoint_written")
        if self.global_rank == 0:
            _replace_folder(staging, path)
        self.barrier("distill_pl_checkpoint_swapped")

    def _frozen_prefixes(self) -> tuple[str, ...]:
        return tuple(getattr(self.lightning_module, "frozen_prefixes", ()))

    def lightning_module_state_dict(self) -> dict[str, Any]:
        frozen = self._frozen_prefixes()
        return {k: v for k, v in super().lightning_module_state_dict().items() if not k.startswith(frozen)}

    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None) -> dict[str, Any]:
        path = Path(self.broadcast(checkpoint_path))
        frozen = self._frozen_prefixes()
        if not frozen or not _is_sharded_checkpoint(path):
            return super().load_checkpoint(path, weights_only=weights_only)
        import torch
        from torch.distributed.checkpoint import load as dcp_load
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        model = self.model
        weights = {k: v for k, v in get_model_state_dict(model).items() if not k.startswith(frozen)}
        dcp_load({"state_dict": weights}, checkpoint_id=path)  # fails on any key it lacks
        set_model_state_dict(model, weights, options=StateDictOptions(strict=False))
        for index, optimizer in enumerate(self.optimizers):
            key = f"optimizer_{index}"
            state = {key: get_optimizer_state_dict(model, optimizer)}
            dcp_load(state, checkpoint_id=path)
            set_optimizer_state_dict(model, optimizer, optim_state_dict=state[key],
                                     options=StateDictOptions(cpu_offload=True))
        metadata = torch.load(path / _METADATA_FILENAME, weights_only=weights_only)
        metadata["state_dict"] = weights
        return metadata


def _replace_folder(new: Path, path: Path) -> None:
    """Make ``new`` (a complete checkpoint folder) ``path``, fsyncing its files first."""
    for file in new.iterdir():
        fd = os.open(file, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    old = path.with_name(f".{path.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if path.is_dir():
        os.replace(path, old)
    elif path.exists():
        path.unlink()
    os.replace(new, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    shutil.rmtree(old, ignore_errors=True)
