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
