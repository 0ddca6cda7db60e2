"""Train loaders that resume mid-epoch at the exact batch where a checkpoint was taken.

Lightning stores the ``state_dict`` of a train DataLoader that has one in the checkpoint's
loop state and calls ``load_state_dict`` on resume. For a sized loader Lightning does not
prefetch, so the number of batches this loader has yielded when a checkpoint is written is
exactly the number of training steps taken in the epoch.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
from torch.utils.data import DataLoader, Dataset, Sampler


class EpochShuffleSampler(Sampler[int]):
    """A permutation of ``range(len(dataset))`` drawn from (seed, epoch), optionally
    starting ``start`` items in (set once by a resume, then cleared).

    ``set_epoch`` (called by Lightning before each epoch) also forwards the epoch to the
    dataset when it has ``set_epoch``.
    """

    def __init__(self, dataset: Dataset, seed: int, shuffle: bool = True):
        self.dataset = dataset
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.dataset)

    def __iter__(self) -> Iterator[int]:
        n = len(self.dataset)
        order = np.random.default_rng([self.seed, self.epoch]).permutation(n) if self.shuffle else np.arange(n)
        start, self.start = self.start, 0
        yield from order[start:].tolist()


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
