"""FrameGridLogger: rows x (first, middle, last frame), checked pixel by pixel in the PNG and in
TensorBoard; one render per optimizer step under gradient accumulation."""

from __future__ import annotations

import io

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from PIL import Image
from torch.utils.data import DataLoader

from distill_pl.callbacks.frame_grid import FrameGridLogger
from distill_pl.data.datamodule import VideoDataModule
from distill_pl.util.media import to_uint8

T, H, W, SCALE, MARGIN, PAD = 5, 6, 7, 2, 150, 2
LABELS = ["student 1-step", "teacher 1-step", "control", "ground truth"]


def videos(batch: int = 2) -> dict[str, torch.Tensor]:
    """Four rows of random videos [B, 3, T, H, W] in [-1, 1], different per row and frame."""
    g = torch.Generator().manual_seed(0)
    return {label: torch.rand(batch, 3, T, H, W, generator=g) * 2 - 1 for label in LABELS}


class GridModule(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(1, 1)
        self.rows = videos()
        self.calls: list[int] = []

    def grid_rows(self, batch, seed):
        assert not self.training and batch["video"].shape[0] == 2  # max_videos
        self.calls.append(self.trainer.global_step)
        return self.rows

    def training_step(self, batch, batch_idx):
        return self.layer(batch["video"].mean().view(1, 1)).sum()

    def validation_step(self, batch, batch_idx):
        pass

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class Data(L.LightningDataModule):
    def __init__(self):
        super().__init__()
        self.items = [{"video": torch.zeros(3, T, H, W)} for _ in range(8)]

    def train_dataloader(self):
        return DataLoader(self.items, batch_size=1)

    def val_dataloader(self):
        return DataLoader(self.items, batch_size=3)


def check_grid(image: np.ndarray, rows: dict[str, torch.Tensor], i: int) -> None:
    """``image`` [H, W, 3] uint8: a label margin, then 4 rows x 3 columns (frames 0, T//2, T-1)."""
    cell_h, cell_w = (H + PAD) * SCALE, (W + PAD) * SCALE
    assert image.shape == (4 * cell_h - PAD * SCALE, MARGIN + 3 * cell_w - PAD * SCALE, 3)
    for r, label in enumerate(LABELS):
        for c, frame in enumerate((0, T // 2, T - 1)):
            expected = to_uint8(rows[label][i][:, frame])  # [3, H, W]
            expected = expected.repeat_interleave(SCALE, 1).repeat_interleave(SCALE, 2)
            y, x = r * cell_h, MARGIN + c * cell_w
            cell = torch.from_numpy(image[y: y + H * SCALE, x: x + W * SCALE]).permute(2, 0, 1)
            assert torch.equal(cell, expected), (label, frame)
    assert (image[:, :MARGIN] < 255).any()  # labels were drawn


def test_grid_png_and_tensorboard_image_hold_the_right_frames(tmp_path):
    module = GridModule()
    logger = TensorBoardLogger(tmp_path, name="grid")
    trainer = L.Trainer(logger=logger, callbacks=[FrameGridLogger(max_videos=2, scale=SCALE)],
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.validate(module, datamodule=Data(), verbose=False)
    logger.experiment.flush()
    assert module.calls == [0]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0})
    events.Reload()
    for i in range(2):
        png = np.asarray(Image.open(tmp_path / f"grid/version_0/grids/step000000_{i}.png").convert("RGB"))
        check_grid(png, module.rows, i)
        [event] = events.Images(f"grid/{i}")
        logged = np.asarray(Image.open(io.BytesIO(event.encoded_image_string)).convert("RGB"))
        assert np.array_equal(logged, png)


def test_one_render_per_optimizer_step_with_gradient_accumulation(tmp_path):
    module = GridModule()
    trainer = L.Trainer(
        max_steps=3, accumulate_grad_batches=2, limit_val_batches=0, logger=False,
        enable_checkpointing=False, callbacks=[FrameGridLogger(every_n_steps=1, scale=1)],
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
    )
    trainer.fit(module, datamodule=Data())
    assert module.calls == [0, 1, 2, 3]


class DepthData(Data, VideoDataModule):
    """The stand-in items, from a VideoDataModule whose control is the manifest's depth videos."""

    def __init__(self):
        VideoDataModule.__init__(self, control="video", control_key="depth")
        self.items = Data().items

    def prepare_data(self):
        pass

    def setup(self, stage=None):
        pass


def test_the_control_row_is_labelled_with_the_data_modality(tmp_path, monkeypatch):
    from distill_pl.callbacks import frame_grid

    drawn = []
    draw = frame_grid.label_rows
    monkeypatch.setattr(frame_grid, "label_rows",
                        lambda image, labels, **kw: drawn.append(labels) or draw(image, labels, **kw))
    trainer = L.Trainer(logger=False, callbacks=[FrameGridLogger(max_videos=2, scale=1)], enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)
    trainer.validate(GridModule(), datamodule=DepthData(), verbose=False)
    assert drawn == [["student 1-step", "teacher 1-step", "control: depth", "ground truth"]] * 2  # one per video

    rows = {"student": None, "control": None, "control (unused)": None}
    assert list(frame_grid.control_labelled(rows, VideoDataModule(control="blur"))) == \
        ["student", "control: blur", "control (unused)"]
    assert list(frame_grid.control_labelled(rows, VideoDataModule())) == \
        ["student", "control: edge", "control (unused)"]
    assert frame_grid.control_labelled(rows, Data()) is rows  # another data module: labels as the module gives them
