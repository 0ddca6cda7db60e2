"""LitData streaming copies of KD pair shards: items equal the shard reader's bit for bit."""

import pytest
import torch

from tests.data.test_pairs_v2 import clips, write_split  # noqa: F401  (fixture)

litdata = pytest.importorskip("litdata", reason="scripts/setup.sh installs litdata")
from distill_pl.data.pairs import PairShardDataset  # noqa: E402
from distill_pl.data.streaming import StreamingShardDataset, optimize  # noqa: E402


def assert_items_equal(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for key, value in a.items():
        if isinstance(value, torch.Tensor):
            assert value.dtype == b[key].dtype and torch.equal(value, b[key]), key
        else:
            assert type(value) is type(b[key]) and value == b[key], key


@pytest.mark.parametrize("levels, storage", [(0, "bfloat16"), (2, "float32")])
def test_streamed_pairs_equal_the_shard_items(tmp_path, clips, levels, storage):  # noqa: F811
    src = tmp_path / "pairs"
    write_split(src / "train", clips, num_examples=6, shard_size=4, levels=levels, storage_dtype=storage)
    optimize(src, tmp_path / "streaming", chunk_size=4)
    local = PairShardDataset(src / "train")
    streamed = StreamingShardDataset(str(tmp_path / "streaming" / "train"))
    assert len(streamed) == len(local) == 6 and streamed.metadata == local.metadata
    negative, local_negative = streamed.negative_prompt_embedding(), local.negative_prompt_embedding()
    assert all(torch.equal(x, y) for x, y in zip(negative, local_negative))
    for i in (0, 5, 3):  # random access
        assert_items_equal(streamed[i], local[i])
    # iteration without shuffling: index order, the same items
    for i, item in enumerate(streamed):
        assert_items_equal(item, local[i])
    # collated batches equal the local loader's
    loader = litdata.StreamingDataLoader(streamed, batch_size=3)
    for batch, expected in zip(loader, torch.utils.data.DataLoader(local, batch_size=3)):
        assert_items_equal(batch, expected)


def test_streamed_pairs_of_control_videos_equal_the_shard_items(tmp_path):
    """Pairs whose control is the manifest's depth video: the streaming copy keeps each row's
    control video reference, and its items equal the shard reader's."""
    from tests.data.test_control_videos import manifest_with_control, write_split_of

    manifest, _ = manifest_with_control(tmp_path)
    layout = write_split_of(tmp_path, manifest)
    optimize(layout.folder.parent, tmp_path / "streaming", chunk_size=2)
    local = PairShardDataset(layout.folder)
    streamed = StreamingShardDataset(str(tmp_path / "streaming" / "train"))
    assert streamed.metadata == local.metadata and streamed.metadata["control_key"] == "depth"
    for i in (2, 0):
        assert_items_equal(streamed[i], local[i])


def test_optimize_is_deterministic(tmp_path, clips):  # noqa: F811
    src = tmp_path / "pairs"
    write_split(src / "train", clips, num_examples=4, shard_size=2)
    optimize(src, tmp_path / "a", chunk_size=2)
    optimize(src, tmp_path / "b", chunk_size=2)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert any(p.suffix == ".bin" for p in files)
    assert files == sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*") if p.is_file())
    for p in files:
        if p.name != "index.json":
            assert (tmp_path / "a" / p).read_bytes() == (tmp_path / "b" / p).read_bytes(), p


def test_without_litdata_the_import_error_says_how_to_install(monkeypatch):
    import importlib
    import sys

    monkeypatch.setitem(sys.modules, "litdata", None)  # `import litdata` raises ImportError
    monkeypatch.delitem(sys.modules, "distill_pl.data.streaming")
    with pytest.raises(ImportError, match="needs litdata: run scripts/setup.sh"):
        importlib.import_module("distill_pl.data.streaming")


def test_streaming_needs_pairs_or_latents_mode():
    from distill_pl.data.datamodule import VideoDataModule

    with pytest.raises(ValueError, match="streaming_dir streams KD pairs or clip latents"):
        VideoDataModule(mode="clips", streaming_dir="somewhere")


def write_indices(folder, n: int, chunk_size: int) -> None:
    """A LitData folder whose row ``i`` is ``{"index": i}``."""
    from litdata.streaming.writer import BinaryWriter

    writer = BinaryWriter(str(folder), chunk_size=chunk_size)
    for i in range(n):
        writer[i] = {"index": i}
    writer.done()
    writer.merge()


@pytest.mark.parametrize("n, replicas, batch_size, workers, chunk_size",
                         [(16, 2, 2, 0, 4), (23, 2, 3, 0, 5), (40, 3, 2, 0, 7), (29, 2, 2, 2, 4), (50, 2, 3, 3, 6)])
def test_local_litdata_rank_split_reads_the_streaming_batches_of_each_rank(tmp_path, monkeypatch, n, replicas,
                                                                           batch_size, workers, chunk_size):
    """Without shuffling, rank r's batches from EpochShuffleSampler(rank_split="litdata") equal
    those of a StreamingDataLoader on rank r (LitData told the rank by WORLD_SIZE / GLOBAL_RANK),
    whatever the chunk size, including the remainder dropped and DataLoader workers."""
    from distill_pl.data.resumable import EpochShuffleSampler, ResumableDataLoader
    from tests.data.test_resumable import Items

    write_indices(tmp_path / "rows", n, chunk_size)
    seen = set()
    for rank in range(replicas):
        monkeypatch.setenv("WORLD_SIZE", str(replicas))
        monkeypatch.setenv("GLOBAL_RANK", str(rank))
        streamed = litdata.StreamingDataset(str(tmp_path / "rows"), shuffle=False, drop_last=True)
        loader = litdata.StreamingDataLoader(streamed, batch_size=batch_size, num_workers=workers)
        expected = [batch["index"].tolist() for batch in loader]
        sampler = EpochShuffleSampler(Items(n), seed=0, shuffle=False, num_replicas=replicas, rank=rank,
                                      rank_split="litdata", batch_size=batch_size, num_workers=workers)
        local = ResumableDataLoader(sampler.dataset, sampler, batch_size=batch_size)
        assert len(local) == len(expected) == n // (batch_size * replicas)
        assert [batch.tolist() for batch in local] == expected, rank
        seen |= {i for batch in expected for i in batch}
    assert len(seen) == len(local) * batch_size * replicas  # the ranks are disjoint


def test_streamed_pairs_with_conditioning_images_equal_the_shard_items(tmp_path):
    """Pairs whose manifest names a conditioning image for one clip: the streaming copy keeps
    each row's image reference ("" for the clip without one), and its items equal the shard
    reader's."""
    from tests.data.test_condition_images import dataset, manifest_with_image, write_image, write_split_of

    manifest = manifest_with_image(tmp_path)
    write_image(tmp_path / "images" / "a.png", 48, 80, seed=5)
    layout = write_split_of(tmp_path, dataset(manifest, cache_frames=False))
    optimize(layout.folder.parent, tmp_path / "streaming", chunk_size=2)
    local = PairShardDataset(layout.folder)
    streamed = StreamingShardDataset(str(tmp_path / "streaming" / "train"))
    assert streamed.metadata == local.metadata and streamed.metadata["control"] == "clip"
    for i in range(4):
        assert_items_equal(streamed[i], local[i])
