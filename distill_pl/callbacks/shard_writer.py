"""Write prediction outputs as shards: KD pairs (:mod:`distill_pl.data.pairs`) or precomputed
clip latents (:mod:`distill_pl.data.clip_latents`)."""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from distill_pl.callbacks.module_protocols import ShardBuilder, require
from distill_pl.data.folder_lock import FolderLock
from distill_pl.data.shards import remove_temp_files
from distill_pl.util.progress import ProgressLines


class PairShardWriter(BasePredictionWriter):
    """Buffers the examples of each shard and writes the shard, atomically, once complete.

    Shard ``k`` of a split holds examples ``[k * shard_size, (k + 1) * shard_size)``; the
    layout (folder, sizes) and the data part of the metadata come from the datamodule
    (``pair_layout``, ``pair_generation_metadata``), the model part from the module's
    ``pair_generation_metadata()``; the module's ``build_shard(rows, common)`` makes the
    tensors and metadata of the format it writes and ``write_shard(path, tensors, metadata)``
    writes them. A prediction is a dict of per-example tensors (first dimension B) and lists
    (``split``, ``caption``, ``path``). Each rank writes only the shards it generates. At setup
    each rank locks the split folders (:mod:`distill_pl.data.folder_lock`: a second run on
    them fails at once) and removes the stale temp files of its shards (left by a killed run).
    When stdout is not a terminal, each written shard prints a line with the examples/s and
    the ETA.
    """

    def __init__(self) -> None:
        super().__init__(write_interval="batch")
        self._buffers: dict[tuple[str, int], dict[int, dict[str, Any]]] = {}
        self._progress: ProgressLines | None = None
        self._locks: list[FolderLock] = []

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "predict":
            return
        require(pl_module, ShardBuilder, self)
        self._buffers = {}
        datamodule = trainer.datamodule  # set up before callbacks (Lightning's order)
        for split in ("train", "val"):
            layout = datamodule.pair_layout(split)
            self._locks.append(FolderLock(layout.folder, trainer.global_rank).acquire())
            remove_temp_files(layout, layout.shards_of_rank(trainer.global_rank, trainer.world_size))

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        total = sum(len(loader.dataset) for loader in trainer.predict_dataloaders)
        rank = f" (rank {trainer.global_rank})" if trainer.world_size > 1 else ""
        self._progress = ProgressLines(f"{_what(trainer)}{rank}", total, "examples")

    def write_on_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, prediction: dict, batch_indices,
        batch, batch_idx: int, dataloader_idx: int,
    ) -> None:
        datamodule = trainer.datamodule
        for j, (split, index) in enumerate(zip(prediction["split"], prediction["index"].tolist())):
            layout = datamodule.pair_layout(split)
            k = layout.shard_of(index)
            buffer = self._buffers.setdefault((split, k), {})
            buffer[index] = {
                name: value[j].detach().cpu() if isinstance(value, Tensor) else value[j]
                for name, value in prediction.items()
            }
            if len(buffer) == len(layout.examples(k)):
                self._write(trainer, pl_module, split, k)

    def _write(self, trainer: L.Trainer, pl_module: L.LightningModule, split: str, k: int) -> None:
        datamodule = trainer.datamodule
        layout = datamodule.pair_layout(split)
        buffer = self._buffers.pop((split, k))
        rows = [buffer[i] for i in layout.examples(k)]
        common = {**pl_module.pair_generation_metadata(), **datamodule.pair_generation_metadata(split)}
        tensors, metadata = pl_module.build_shard(rows, common)
        metadata.update(shard_index=k, count=len(rows), first_index=layout.examples(k).start)
        path = layout.path(k)
        pl_module.write_shard(path, tensors, metadata)
        if self._progress is not None:
            self._progress.advance(len(rows), f"wrote {path.parent.name}/{path.name}")

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        for lock in self._locks:
            lock.release()
        self._locks = []

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._buffers:
            unfinished = ", ".join(f"{split}/shard {k}" for split, k in sorted(self._buffers))
            rank_zero_warn(f"{_what(trainer)} generation ended before these shards were complete: {unfinished}; "
                           "they were not written (rerun to generate them)")
            self._buffers = {}


def _what(trainer: L.Trainer) -> str:
    """What the run writes, for its messages: ``KD pairs`` or ``clip latents``."""
    mode = getattr(getattr(trainer.datamodule, "hparams", None), "mode", None)
    return "clip latents" if mode == "latents" else "KD pairs"
