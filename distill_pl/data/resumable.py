"""Train loaders that resume mid-epoch at the exact batch where a checkpoint was taken.

Lightning stores the ``state_dict`` of a train DataLoader that has one in the checkpoint's
loop state and calls ``load_state_dict`` on resume. For a sized loader Lightning does not
prefetch, so the number of batches this loader has yielded when a checkpoint is written is
exactly the number of training steps taken in the epoch.

Several devices: the sampler is rank-aware (each data-parallel rank takes a strided slice of
one permutation, or with ``rank_split="litdata"`` a contiguous block of it, as a LitData
``StreamingDataset`` splits its rows) and is a ``DistributedSampler``, so Lightning keeps it
as it is whatever ``use_distributed_sampler`` says (a wrapper around it would lose the resume position).
Every rank's loader yields the same number of batches, so the saved position is the same on
every rank.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Literal

import numpy as np
from torch.utils.data import DataLoader, Dataset, DistributedSampler


def data_parallel_layout(trainer) -> tuple[int, int]:
    """(rank, replicas) of the data-parallel group of ``trainer``: Lightning's
    ``distributed_sampler_kwargs`` on several devices, ``(0, 1)`` on one or without a trainer."""
    kwargs = trainer.distributed_sampler_kwargs if trainer is not None else None
    return (kwargs["rank"], kwargs["num_replicas"]) if kwargs else (0, 1)


class EpochShuffleSampler(DistributedSampler):
    """This rank's share of a permutation of ``range(len(dataset))`` drawn from (seed, epoch)
    (``shuffle``; index order without), optionally starting ``start`` items into the share (set
    once by a resume, then cleared).

    ``rank_split="strided"`` (default): rank ``r`` of ``num_replicas`` takes
    ``order[r::num_replicas]`` of the permutation cut to a multiple of ``num_replicas`` (the
    last ``len(dataset) % num_replicas`` items of an epoch are dropped, so every rank takes the
    same number of steps). Batch ``k`` of all ranks together then holds the items of batch
    ``k`` of one process with ``num_replicas`` times the batch size: item ``j`` of rank ``r``'s
    batch is item ``r + num_replicas * j`` of it.

    ``rank_split="litdata"``: the layout of a LitData ``StreamingDataset`` without shuffling
    (``drop_last``), given the loader's ``batch_size`` and ``num_workers``. Each rank takes
    ``m = len(dataset) // (batch_size * num_replicas)`` whole batches, rank ``r`` the contiguous
    block ``order[r * m * batch_size : (r + 1) * m * batch_size]`` (the rest of the epoch is
    dropped). That block is cut into ``max(1, num_workers)`` contiguous runs of whole batches
    (worker ``i`` gets ``m // workers`` batches, one more for ``i < m % workers``) and read one
    batch per run in turn, as a DataLoader alternates between LitData's workers. With
    ``shuffle=False`` a rank's batches are then those of a ``StreamingDataLoader`` over a
    LitData copy of the dataset (same batch size and workers).

    ``set_epoch`` (called by Lightning before each epoch) also forwards the epoch to the
    dataset when it has ``set_epoch``.
    """

    def __init__(self, dataset: Dataset, seed: int, shuffle: bool = True, num_replicas: int = 1, rank: int = 0,
                 rank_split: Literal["strided", "litdata"] = "strided", batch_size: int = 1, num_workers: int = 0):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=True)
        if rank_split not in ("strided", "litdata"):
            raise ValueError(f"rank_split must be 'strided' or 'litdata', not {rank_split!r}")
        self.rank_split = rank_split
        self.batch_size = batch_size
        self.workers = max(1, num_workers)
        if rank_split == "litdata":
            self.num_samples = len(dataset) // (batch_size * num_replicas) * batch_size
        self.start = 0

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)

    def _share(self, order: np.ndarray) -> np.ndarray:
        """This rank's items of the epoch's ``order``, in the order they are read."""
        if self.rank_split == "strided":
            return order[self.rank : self.total_size : self.num_replicas]
        block = order[self.rank * self.num_samples : (self.rank + 1) * self.num_samples]
        batches = block.reshape(-1, self.batch_size)
        count, extra = divmod(len(batches), self.workers)
        sizes = [count + (i < extra) for i in range(self.workers)]
        ends = np.cumsum(sizes)
        runs = [batches[end - size : end] for size, end in zip(sizes, ends)]
        return np.concatenate([run[k] for k in range(max(sizes)) for run in runs if k < len(run)] or [block[:0]])

    def __iter__(self) -> Iterator[int]:
        n = len(self.dataset)
        order = np.random.default_rng([self.seed, self.epoch]).permutation(n) if self.shuffle else np.arange(n)
        share = self._share(order)
        start, self.start = self.start, 0
        yield from share[start:].tolist()


class ResumableDataLoader(DataLoader):
    """A DataLoader over an :class:`EpochShuffleSampler` that records (epoch, batches
    yielded) and, after ``load_state_dict``, skips the batches already trained on."""

    def __init__(self, dataset: Dataset, sampler: EpochShuffleSampler, **kwargs: Any):
        super().__init__(dataset, sampler=sampler, **kwargs)
        self._yielded = 0
        self._resume_from: tuple[int, int] | None = None

    def __iter__(self) -> Iterator[Any]:
        sampler: EpochShuffleSampler = self.sampler
        self._yielded = 0
        if self._resume_from is not None:
            epoch, yielded = self._resume_from
            self._resume_from = None
            if epoch == sampler.epoch and 0 < yielded < len(self):
                sampler.start = yielded * self.batch_size
                self._yielded = yielded
        for batch in super().__iter__():
            self._yielded += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.sampler.epoch, "batches_yielded": self._yielded}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._resume_from = (int(state["epoch"]), int(state["batches_yielded"]))
