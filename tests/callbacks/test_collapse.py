"""CollapseMonitor on the tiny DMD2: a student lr of 1e-2 saturates the samples within one
student step; the monitor stops the run, or rolls every network back to the checkpoint
before the collapse."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from distill_pl.callbacks.collapse import CollapseError, CollapseMonitor
from distill_pl.data.datamodule import VideoDataModule
from distill_pl.training.dmd2 import DMD2Module
from tests.cli_helpers import REPO

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]  # about 1.5 min on a loaded 2-core machine
DMD2 = dict(student_lr=1e-2, fake_score_lr=2e-5, discriminator_lr=2e-5, discriminator_hidden=16, feature_block=2)


@pytest.fixture(scope="module")
def dm(tmp_path_factory) -> VideoDataModule:
    data = VideoDataModule(cache_dir=str(tmp_path_factory.mktemp("cache")), num_frames=4, frame_stride=4,
                           height=32, width=32, batch_size=4, samples_per_epoch=64, cache_frames=False)
    data.prepare_data()
    data.setup("fit")
    return data


def trainer(max_steps: int, callbacks: list, root: Path) -> L.Trainer:
    return L.Trainer(max_steps=max_steps, logger=False, enable_progress_bar=False, enable_model_summary=False,
                     limit_val_batches=0, callbacks=callbacks, default_root_dir=root,
                     enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks))


def test_a_collapsing_student_is_stopped(dm, tmp_path):
    monitor = CollapseMonitor(every_n_steps=5, patience=2)
    with pytest.raises(CollapseError, match=r"collapsed at steps 5\.\.10: .* saturation 0\.\d+ \(max 0\.25\); stopping"):
        trainer(30, [monitor], tmp_path).fit(DMD2Module(str(REPO / "teachers/tiny"), **DMD2), datamodule=dm)
    (_, _, healthy), *_ = [(s, d, sat) for s, d, sat in monitor.history]
    assert [s for s, _, _ in monitor.history] == [5, 10] and healthy > 0.25


class RecordingMonitor(CollapseMonitor):
    def _restore(self, trainer, pl_module, path):
        super()._restore(trainer, pl_module, path)
        self.restored = (path, {k: v.clone() for k, v in pl_module.state_dict().items()})


def test_rollback_restores_student_and_critic_from_before_the_collapse(dm, tmp_path):
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1)
    monitor = RecordingMonitor(every_n_steps=2, patience=1, action="rollback", max_rollbacks=1)
    module = DMD2Module(str(REPO / "teachers/tiny"), **DMD2)
    with pytest.warns(UserWarning, match="rolled back the networks and optimizers to .*step=4.ckpt"):
        with pytest.raises(CollapseError, match="stopping after 1 rollback"):
            trainer(30, [checkpoints, monitor], tmp_path).fit(module, datamodule=dm)
    path, restored = monitor.restored
    saved = torch.load(path, map_location="cpu", weights_only=True)
    assert saved["global_step"] == 4  # the last healthy check: before the first student step
    for prefix in ("student.", "fake_score.", "discriminator."):
        keys = [k for k in saved["state_dict"] if k.startswith(prefix)]
        assert keys, prefix
        assert all(torch.equal(restored[k], saved["state_dict"][k]) for k in keys), prefix
