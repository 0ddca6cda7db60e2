"""Precomputed clip latents through a LitData streaming copy: items equal the shard reader's."""

import pytest

from distill_pl.data.clip_latents import ClipLatentDataset
from tests.data.test_streaming import assert_items_equal
from tests.training.test_clip_latents import cache_dir, precomputed, vae_folder  # noqa: F401  (fixtures)

pytest.importorskip("litdata", reason="scripts/setup.sh installs litdata")
from distill_pl.data.streaming import StreamingShardDataset, optimize  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def test_streamed_clip_latents_equal_the_shard_items(precomputed, tmp_path):  # noqa: F811
    optimize(precomputed, tmp_path / "streaming", chunk_size=4)
    for split in ("train", "val"):
        local = ClipLatentDataset(precomputed / split)
        streamed = StreamingShardDataset(str(tmp_path / "streaming" / split))
        assert streamed.kind == "clip_latents" and streamed.metadata == local.metadata
        assert len(streamed) == len(local) > 0
        assert local.metadata["storage_dtype"] == "bfloat16" and streamed.bfloat16_keys
        for i, item in enumerate(streamed):
            assert_items_equal(item, local[i])
