"""Log a rows x (first, middle, last frame) grid of a fixed validation batch."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from torch import Tensor

from distill_pl.callbacks.module_protocols import GridRows, require
from distill_pl.data.controls import ControlSettings
from distill_pl.data.datamodule import VideoDataModule
from distill_pl.util.media import frame_grid, label_rows, upscale, write_png


class FrameGridLogger(L.Callback):
    """Every ``every_n_steps`` training steps and at the end of every validation, render
    ``pl_module.grid_rows(batch, seed)`` -- an ordered ``{label: video [B, 3, T, H, W]}``
    -- for a fixed validation batch with a fixed seed.

    One image per video (up to ``max_videos``): rows in the order of the dict, columns =
    first, middle, last frame. With a :class:`~distill_pl.data.datamodule.VideoDataModule`
    the row labelled ``control`` is labelled with the data's control modality instead
    (``control: edge``, ``control: blur``, ``control: depth``, ...). Logged to TensorBoard
    with ``add_image`` (tag ``grid/<i>``) and written as
    ``<log_dir>/grids/step<global_step>_<i>.png``.
    """

    def __init__(self, every_n_steps: int = 0, seed: int = 0, max_videos: int = 2, scale: int = 4):
        self.every_n_steps = every_n_steps
        self.seed = seed
        self.max_videos = max_videos
        self.scale = scale
        self._batch: dict | None = None
        self._last_periodic_step: int | None = None

    def _fixed_batch(self, trainer: L.Trainer) -> dict:
        if self._batch is None:
            batch = next(iter(trainer.datamodule.val_dataloader()))
            self._batch = {
                k: (v[: self.max_videos] if isinstance(v, (Tensor, list)) else v) for k, v in batch.items()
            }
        return self._batch

    def render(self, trainer: L.Trainer, pl_module: L.LightningModule) -> list[Path]:
        """Every rank computes the rows (under FSDP2 every forward is a collective, and
        ``trainer.log_dir`` is a broadcast), rank 0 writes them."""
        out_dir = Path(trainer.log_dir or trainer.default_root_dir) / "grids"
        rows = self._rows(trainer, pl_module)
        return self._write(trainer, rows, out_dir) if trainer.is_global_zero else []

    def _rows(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Tensor]:
        batch = {
            k: v.to(pl_module.device) if isinstance(v, Tensor) else v
            for k, v in self._fixed_batch(trainer).items()
        }
        was_training = pl_module.training
        pl_module.eval()
        with torch.no_grad():
            rows = pl_module.grid_rows(batch, self.seed)
        pl_module.train(was_training)
        return control_labelled(rows, trainer.datamodule)

    def _write(self, trainer: L.Trainer, rows: dict[str, Tensor], out_dir: Path) -> list[Path]:
        labels = list(rows)
        step = trainer.global_step
        written = []
        for i in range(len(next(iter(rows.values())))):
            grid = upscale(frame_grid([rows[k][i].cpu() for k in labels]), self.scale)
            h = rows[labels[0]].shape[-2] * self.scale
            image = label_rows(grid, labels, row_height=h + 2 * self.scale)
            for logger in trainer.loggers:
                exp = getattr(logger, "experiment", None)
                if hasattr(exp, "add_image"):
                    exp.add_image(f"grid/{i}", image, global_step=step)
            written.append(write_png(out_dir / f"step{step:06d}_{i}.png", image))
        return written

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        require(pl_module, GridRows, self)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # Called per micro-batch: with gradient accumulation, global_step repeats.
        step = trainer.global_step
        if self.every_n_steps and step % self.every_n_steps == 0 and step != self._last_periodic_step:
            self._last_periodic_step = step
            self.render(trainer, pl_module)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self.render(trainer, pl_module)


def control_labelled(rows: dict[str, Tensor], datamodule) -> dict[str, Tensor]:
    """``rows`` with the label ``control`` replaced by ``control: <modality>`` (see
    :attr:`~distill_pl.data.controls.ControlSettings.modality`) when ``datamodule`` is a
    :class:`~distill_pl.data.datamodule.VideoDataModule`; the order is kept."""
    if not isinstance(datamodule, VideoDataModule):
        return rows
    label = f"control: {ControlSettings.from_metadata(datamodule.hparams).modality}"
    return {label if name == "control" else name: video for name, video in rows.items()}
