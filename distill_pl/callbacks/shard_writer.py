"""Write KD pair generation outputs as shards (format: :mod:`distill_pl.data.pairs`)."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_warn

from distill_pl.data.folder_lock import FolderLock
from distill_pl.data.pairs import EXAMPLE_TENSORS, FORMAT_VERSION, remove_temp_files, write_shard


class PairShardWriter(BasePredictionWriter):
    """Buffers the examples of each shard and writes the shard, atomically, once complete.

    Shard ``k`` of a split holds examples ``[k * shard_size, (k + 1) * shard_size)``; the
    layout (folder, sizes) and the data part of the metadata come from the datamodule
    (``pair_layout``, ``pair_generation_metadata``), the teacher part from the module's
    ``pair_generation_metadata()``. Each rank writes only the shards it generates. At setup
    each rank locks the split folders (:mod:`distill_pl.data.folder_lock`: a second run on
    them fails at once) and removes the stale temp files of its shards (left by a killed run).
    """

    def __init__(self) -> None:
        super().__init__(write_interval="batch")
        self._buffers: dict[tuple[str, int], dict[int, dict[str, Any]]] = {}
        self._locks: list[FolderLock] = []

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "predict":
            return
        self._buffers = {}
        datamodule = trainer.datamodule  # set up before callbacks (Lightning's order)
        for split in ("train", "val"):
            layout = datamodule.pair_layout(split)
            self._locks.append(FolderLock(layout.folder, trainer.global_rank).acquire())
            remove_temp_files(layout, layout.shards_of_rank(trainer.global_rank, trainer.world_size))

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
                **{name: prediction[name][j].detach().cpu() for name in EXAMPLE_TENSORS},
                "caption": prediction["caption"][j],
                "path": prediction["path"][j],
            }
            if len(buffer) == len(layout.examples(k)):
                self._write(trainer, pl_module, split, k)

    def _write(self, trainer: L.Trainer, pl_module: L.LightningModule, split: str, k: int) -> None:
        datamodule = trainer.datamodule
        layout = datamodule.pair_layout(split)
        buffer = self._buffers.pop((split, k))
        rows = [buffer[i] for i in layout.examples(k)]
        tensors = {name: torch.stack([row[name] for row in rows]) for name in EXAMPLE_TENSORS}
        embeds, mask = datamodule.negative_prompt_embedding()
        tensors["negative_text_embeds"], tensors["negative_text_mask"] = embeds, mask
        metadata = {
            "format_version": FORMAT_VERSION,
            **pl_module.pair_generation_metadata(),
            **datamodule.pair_generation_metadata(split),
            "latent_shape": list(tensors["noise"].shape[1:]),
            "video_shape": list(tensors["video"].shape[1:]),
            "text_shape": list(tensors["text_embeds"].shape[1:]),
            "shard_index": k,
            "count": len(rows),
            "first_index": layout.examples(k).start,
            "captions": [row["caption"] for row in rows],
            "paths": [row["path"] for row in rows],
        }
        write_shard(layout.path(k), tensors, metadata)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        for lock in self._locks:
            lock.release()
        self._locks = []

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._buffers:
            unfinished = ", ".join(f"{split}/shard {k}" for split, k in sorted(self._buffers))
            rank_zero_warn(f"KD pair generation ended before these shards were complete: {unfinished}; "
                           "they were not written (rerun to generate them)")
            self._buffers = {}
