"""Train loaders that resume mid-epoch at the exact batch where a checkpoint was taken.

Lightning stores the ``state_dict`` of a train DataLoader that has one in the checkpoint's
loop state and calls ``load_state_dict`` on resume. For a sized loader Lightning does not
prefetch, so the number of batches this loader has yielded when a checkpoint is written is
exactly the number of training steps taken in the epoch.

Several devices: the sampler is rank-aware (each data-parallel rank takes a strided slice of
one permutation) and is a ``DistributedSampler``, so Lightning keeps it as it is whatever
``use_distributed_sampler`` says (a wrapper around it would lose the resume position).
Every rank's loader yields the same number of batches, so the saved position is the same on
every rank.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
from torch.utils.data import DataLoader, Dataset, DistributedSampler


def data_parallel_layout(trainer) -> tuple[int, int]:
    """(rank, replicas) of the data-parallel group of ``trainer``: Lightning's
    ``distributed_sampler_kwargs`` on several devices, ``(0, 1)`` on one or without a trainer."""
    kwargs = trainer.distributed_sampler_kwargs if trainer is not None else None
    return (kwargs["rank"], kwargs["num_replicas"]) if kwargs else (0, 1)


class EpochShuffleSampler(DistributedSampler):
    """This rank's share of a permutation of ``range(len(dataset))`` drawn from (seed, epoch),
    optionally starting ``start`` items into the share (set once by a resume, then cleared).

    Rank ``r`` of ``num_replicas`` takes ``order[r::num_replicas]`` of the permutation cut to
    a multiple of ``num_replicas`` (the last ``len(dataset) % num_replicas`` items of an epoch
    are dropped, so every rank takes the same number of steps). Batch ``k`` of all ranks
    together then holds the items of batch ``k`` of one process with ``num_replicas`` times
    the batch size: item ``j`` of rank ``r``'s batch is item ``r + num_replicas * j`` of it.

    ``set_epoch`` (called by Lightning before each epoch) also forwards the epoch to the
    dataset when it has ``set_epoch``.
    """

    def __init__(self, dataset: Dataset, seed: int, shuffle: bool = True, num_replicas: int = 1, rank: int = 0):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=True)
        self.start = 0

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)

    def __iter__(self) -> Iterator[int]:
        n = len(self.dataset)
        order = np.random.default_rng([self.seed, self.epoch]).permutation(n) if self.shuffle else np.arange(n)
        share = order[self.rank : self.total_size : self.num_replicas]
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
