"""Lightning strategies for distill_pl: FSDP2 sharding on ``ModelParallelStrategy``.

``--trainer.strategy distill_pl.strategies.FSDP2Strategy`` shards every network of the KD and
DMD2 stages per transformer block over all processes (their ``configure_model`` hooks apply
``fully_shard``, see :mod:`distill_pl.models.sharding`) and saves distributed checkpoints (a
folder per checkpoint, one shard file per rank). It runs on GPUs (NCCL) and on CPUs (gloo).
"""

from __future__ import annotations

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
        if self._data_parallel_size == "auto":
            tp = 1 if self._tensor_parallel_size == "auto" else int(self._tensor_parallel_size)
            self._data_parallel_size = self.num_nodes * self.num_processes // tp
        super().setup_environment()

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
