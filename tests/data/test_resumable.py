"""EpochShuffleSampler / ResumableDataLoader on several (fake) ranks, without processes."""

from __future__ import annotations

from types import SimpleNamespace

import lightning as L
import pytest
from torch.utils.data import Dataset

from distill_pl.data.resumable import EpochShuffleSampler, ResumableDataLoader, data_parallel_layout


class Items(Dataset):
    """Item ``i`` is ``i``; remembers the epoch the sampler forwards."""

    def __init__(self, n: int):
        self.n = n
        self.epoch = None

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch


def loader(n: int, batch_size: int, rank: int = 0, replicas: int = 1, epoch: int = 0) -> ResumableDataLoader:
    sampler = EpochShuffleSampler(Items(n), seed=7, num_replicas=replicas, rank=rank)
    sampler.set_epoch(epoch)
    return ResumableDataLoader(sampler.dataset, sampler, batch_size=batch_size)


def batches(data: ResumableDataLoader) -> list[list[int]]:
    return [b.tolist() for b in data]


@pytest.mark.parametrize("epoch", [0, 1])
def test_two_ranks_read_the_global_batches_of_one_process(epoch):
    """Item j of rank r's batch k is item r + 2 j of batch k of one process with twice the
    batch size; the ranks are disjoint and an epoch reshuffles."""
    single = batches(loader(24, 6, epoch=epoch))
    ranks = [batches(loader(24, 3, rank, 2, epoch)) for rank in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == len(single) == 4
    for k, global_batch in enumerate(single):
        for rank in (0, 1):
            assert ranks[rank][k] == global_batch[rank::2]
    assert sorted(sum(single, [])) == list(range(24))
    assert single != batches(loader(24, 6, epoch=1 - epoch))


def test_ranks_take_the_same_number_of_items_dropping_the_remainder():
    shares = [sum(batches(loader(23, 3, rank, 2)), []) for rank in (0, 1)]
    assert len(shares[0]) == len(shares[1]) == 11 and not set(shares[0]) & set(shares[1])
    assert set(shares[0]) | set(shares[1]) == set(sum(batches(loader(23, 6)), [])[:22])


@pytest.mark.parametrize("rank", [0, 1])
def test_resume_on_each_rank_continues_with_the_next_batch(rank):
    full = batches(loader(24, 3, rank, 2, epoch=1))
    first = loader(24, 3, rank, 2, epoch=1)
    seen = [b.tolist() for _, b in zip(range(2), first)]
    state = first.state_dict()
    assert state == {"epoch": 1, "batches_yielded": 2} and seen == full[:2]
    resumed = loader(24, 3, rank, 2, epoch=1)
    resumed.load_state_dict(state)
    assert batches(resumed) == full[2:]
    assert batches(resumed) == full  # the position is used once
    assert resumed.sampler.dataset.epoch == 1


def test_lightning_keeps_the_sampler_with_use_distributed_sampler_on():
    """A DistributedSampler is left in place (Lightning would wrap any other sampler and the
    wrapper would lose the resume position)."""
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", use_distributed_sampler=True, logger=False)
    assert not trainer._data_connector._requires_distributed_sampler(loader(24, 3, 0, 2))


def test_data_parallel_layout_comes_from_the_trainer():
    assert data_parallel_layout(None) == (0, 1)
    assert data_parallel_layout(SimpleNamespace(distributed_sampler_kwargs=None)) == (0, 1)
    kwargs = {"num_replicas": 4, "rank": 3}
    assert data_parallel_layout(SimpleNamespace(distributed_sampler_kwargs=kwargs)) == (3, 4)


def test_litdata_split_resumes_with_the_next_batch_and_rejects_unknown_splits():
    """rank_split="litdata" (contiguous blocks, here 2 workers' runs interleaved): a loader
    resumed after 3 batches yields the rest of the uninterrupted epoch."""
    def litdata_loader(epoch: int = 1) -> ResumableDataLoader:
        sampler = EpochShuffleSampler(Items(40), seed=7, num_replicas=2, rank=1, rank_split="litdata",
                                      batch_size=3, num_workers=2)
        sampler.set_epoch(epoch)
        return ResumableDataLoader(sampler.dataset, sampler, batch_size=3)

    full = batches(litdata_loader())
    assert len(full) == 6 and len({i for b in full for i in b}) == 18  # 40 // (3 * 2) batches of 3
    first = litdata_loader()
    _ = [b for _, b in zip(range(3), first)]
    resumed = litdata_loader()
    resumed.load_state_dict(first.state_dict())
    assert batches(resumed) == full[3:]
    with pytest.raises(ValueError, match="rank_split must be 'strided' or 'litdata', not 'blocks'"):
        EpochShuffleSampler(Items(4), seed=0, rank_split="blocks")
    from distill_pl.data.datamodule import VideoDataModule

    with pytest.raises(ValueError, match="unknown data.rank_split 'blocks'"):
        VideoDataModule(rank_split="blocks")
