"""KD from a LitData streaming copy of the pairs equals KD from the local shards."""

import lightning as L
import pytest
import torch

from distill_pl.data.datamodule import VideoDataModule
from tests.training.test_kd_pairs import DATA, cache_dir, generated, teacher  # noqa: F401  (fixtures)

pytest.importorskip("litdata", reason="scripts/setup.sh installs litdata")
from distill_pl.data.streaming import optimize  # noqa: E402
from distill_pl.training.kd import KDModule  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


def datamodule(generated, cache_dir, **kwargs) -> VideoDataModule:  # noqa: F811
    settings = {k: DATA[k] for k in ("num_frames", "frame_stride", "height", "width", "max_text_length")}
    return VideoDataModule(mode="pairs", pairs_dir=str(generated), manifest=str(cache_dir / "manifest.jsonl"),
                           cache_dir=str(cache_dir), batch_size=2, val_batch_size=2, shuffle=False,
                           **settings, **kwargs)


@pytest.fixture(scope="module")
def streaming_dir(generated, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("streaming")
    optimize(generated, out, chunk_size=2)
    return out


def test_streaming_batches_equal_the_local_batches(generated, cache_dir, streaming_dir):  # noqa: F811
    local, streamed = datamodule(generated, cache_dir), datamodule(generated, cache_dir, streaming_dir=str(streaming_dir))
    for dm in (local, streamed):
        dm.setup("fit")
    assert streamed.pairs_metadata == local.pairs_metadata
    assert all(torch.equal(a, b) for a, b in zip(streamed.negative_prompt_embedding(), local.negative_prompt_embedding()))
    for loaders in ((local.train_dataloader(), streamed.train_dataloader()),
                    (local.val_dataloader(), streamed.val_dataloader())):
        batches = [list(loader) for loader in loaders]
        assert len(batches[0]) == len(batches[1]) > 0
        for a, b in zip(*batches):
            assert a.keys() == b.keys()
            for key, value in a.items():
                if isinstance(value, torch.Tensor):
                    assert value.dtype == b[key].dtype and torch.equal(value, b[key]), key
                else:
                    assert value == b[key], key


def kd_run(teacher, dm, tmp_path) -> tuple[list[float], dict]:  # noqa: F811
    losses = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    torch.manual_seed(0)
    kd = KDModule(str(teacher), lr=1e-3, ema_decay=0.5, export_dir=None)
    trainer = L.Trainer(max_steps=4, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=1,
                        val_check_interval=2, default_root_dir=tmp_path, callbacks=[Record()])
    trainer.fit(kd, datamodule=dm)
    return losses, {k: v.clone() for k, v in kd.student.state_dict().items()}


def test_kd_from_the_streaming_folder_equals_kd_from_the_shards(generated, cache_dir, streaming_dir, teacher,  # noqa: F811
                                                              tmp_path):
    """6 train pairs, batch 2, no shuffling: 3 steps per epoch, 4 steps cross an epoch boundary."""
    local_losses, local_weights = kd_run(teacher, datamodule(generated, cache_dir), tmp_path / "local")
    losses, weights = kd_run(teacher, datamodule(generated, cache_dir, streaming_dir=str(streaming_dir)),
                             tmp_path / "streaming")
    assert len(losses) == 4 and losses == local_losses
    assert weights.keys() == local_weights.keys()
    assert all(torch.equal(weights[k], local_weights[k]) for k in weights)
