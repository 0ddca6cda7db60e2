import lightning
import pytest
import torch

from distill_pl.data.datamodule import VideoDataModule
from distill_pl.data.prompt_cache import PromptEmbeddingCache

SMALL = dict(
    num_frames=4, frame_stride=2, height=16, width=16, samples_per_epoch=8,
    batch_size=4, val_clips_per_video=2, max_text_length=8, negative_prompt="blurry",
)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("cache"))


def make(cache_dir: str, **overrides) -> VideoDataModule:
    dm = VideoDataModule(cache_dir=cache_dir, **{**SMALL, **overrides})
    dm.prepare_data()
    dm.setup("fit")
    return dm


@pytest.fixture(scope="module")
def dm(cache_dir) -> VideoDataModule:
    return make(cache_dir)


def test_batches_have_documented_keys_shapes_dtypes(dm):
    assert dm.text_dim == 384
    for loader, size in ((dm.train_dataloader(), 4), (dm.val_dataloader(), 4)):
        batch = next(iter(loader))
        assert set(batch) == {"video", "control", "caption", "path", "start", "text_embeds", "text_mask"}
        assert batch["video"].shape == (size, 3, 4, 16, 16) and batch["video"].dtype == torch.float32
        assert batch["video"].min() >= -1 and batch["video"].max() <= 1
        assert batch["control"].shape == (size, 3, 4, 16, 16)
        assert set(batch["control"].unique().tolist()) <= {-1.0, 1.0}
        assert len(batch["caption"]) == len(batch["path"]) == size
        assert batch["start"].shape == (size,) and batch["start"].dtype == torch.long
        assert batch["text_embeds"].shape == (size, 8, 384) and batch["text_embeds"].dtype == torch.float32
        assert batch["text_mask"].shape == (size, 8) and batch["text_mask"].dtype == torch.bool
        embeds, mask = cache(dm).get(batch["caption"])
        assert torch.equal(batch["text_embeds"], embeds) and torch.equal(batch["text_mask"], mask)
    negative, negative_mask = dm.negative_prompt_embedding()
    assert negative.shape == (1, 8, 384) and negative_mask.shape == (1, 8)
    embeds, mask = cache(dm).get(["blurry"])
    assert torch.equal(negative, embeds) and torch.equal(negative_mask, mask)
    assert 2 < negative_mask.sum() < 8 and (negative[~negative_mask] == 0).all()


def cache(dm: VideoDataModule) -> PromptEmbeddingCache:
    file = f"{dm.hparams.cache_dir}/prompt_embeds.safetensors"
    return PromptEmbeddingCache(dm.hparams.text_encoder, file, dm.hparams.max_text_length)


def test_train_and_val_windows_do_not_overlap(dm):
    val_starts: dict[str, list[int]] = {}
    for batch in dm.val_dataloader():
        for path, start in zip(batch["path"], batch["start"].tolist()):
            val_starts.setdefault(path, []).append(start)
    span = dm.train_set.span
    for epoch in range(3):
        dm.train_set.set_epoch(epoch)
        for i in range(len(dm.train_set)):
            video, start = dm.train_set.window(i)
            if str(video.path) in val_starts:
                assert start + span - 1 < min(val_starts[str(video.path)])
    dm.train_set.set_epoch(0)
    batch = next(iter(dm.train_dataloader()))
    for path, start in zip(batch["path"], batch["start"].tolist()):
        if path in val_starts:
            assert start + span - 1 < min(val_starts[path])


def test_same_seed_same_first_batch_and_cached_embeddings(cache_dir, monkeypatch):
    first = next(iter(make(cache_dir).train_dataloader()))

    def no_loading(self):
        raise AssertionError("the text encoder must not be loaded when all prompts are cached")

    monkeypatch.setattr(PromptEmbeddingCache, "_load_encoder", no_loading)
    again = next(iter(make(cache_dir).train_dataloader()))
    for key in ("video", "control", "start", "text_embeds", "text_mask"):
        assert torch.equal(first[key], again[key]), key
    assert first["caption"] == again["caption"] and first["path"] == again["path"]
    other = make(cache_dir, seed=1, samples_per_epoch=64)
    starts = [other.train_set.window(i)[1] for i in range(64)]
    seed0 = make(cache_dir, samples_per_epoch=64)
    assert starts != [seed0.train_set.window(i)[1] for i in range(64)]


def test_worker_processes_give_the_same_batch(dm, cache_dir):
    in_process = next(iter(dm.train_dataloader()))
    workers = make(cache_dir, num_workers=2)
    batch = next(iter(workers.train_dataloader()))
    assert torch.equal(batch["video"], in_process["video"]) and torch.equal(batch["start"], in_process["start"])


class RecordStarts(lightning.LightningModule):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.starts: dict[int, list[int]] = {}

    def training_step(self, batch, batch_idx):
        self.starts.setdefault(self.current_epoch, []).extend(batch["start"].tolist())
        return (self.weight - batch["video"].mean()) ** 2

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_trainer_sets_the_epoch_of_the_windows(cache_dir):
    dm = make(cache_dir, samples_per_epoch=8, batch_size=8)
    model = RecordStarts()
    trainer = lightning.Trainer(
        max_epochs=2, limit_val_batches=0, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
    )
    trainer.fit(model, datamodule=dm)
    for epoch in (0, 1):
        dm.train_set.set_epoch(epoch)
        expected = {dm.train_set.window(i)[1] for i in range(8)}
        assert set(model.starts[epoch]) == expected
    assert model.starts[0] != model.starts[1]
