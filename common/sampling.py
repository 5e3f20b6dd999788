"""What makes a training epoch resumable from any batch, bit for bit: augmentation drawn per (seed, epoch, index),
and batches that can start part-way through an epoch.

With the loader's workers seeded the usual way, an image's augmentation depends on which worker fetched it and how
many images that worker had drawn before, so skipping the first k batches of an epoch on resume would change every
later batch. Here each item draws from generators seeded by (seed, epoch, index) alone, whatever the worker count,
and the batch sampler replays the epoch's order from batch k on.
"""
import itertools
import random
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler


def item_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of one item's augmentation (tuples of ints hash the same in every process and run)."""
    return hash((seed, epoch, index)) % 2**63


class SeededDataset(Dataset):
    """`dataset[index]` computed under torch / python / numpy generators seeded by `item_seed(seed, epoch, index)`;
    the caller's generators are left as they were. Call `set_epoch` before each epoch (the loop's `set_epoch` does);
    other attributes are the wrapped data set's."""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def __getattr__(self, name: str):
        if name == "dataset":  # not set yet (while unpickling in a worker): no recursion
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __len__(self) -> int:
        return len(self.dataset)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(self, index: int):
        seed = item_seed(self.seed, self.epoch, index)
        python_state, numpy_state = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            random.seed(seed)
            np.random.seed(seed % 2**32)
            try:
                return self.dataset[index]
            finally:
                random.setstate(python_state)
                np.random.set_state(numpy_state)


class ResumableBatches(Sampler[list[int]]):
    """The batches of `batch_sampler` (its order fixed by (seed, epoch) through `set_epoch`), from batch `start` of
    the epoch on. `len` is always the whole epoch's, so step counts and schedules do not depend on where a run
    resumed."""

    def __init__(self, batch_sampler: Sampler[list[int]]) -> None:
        self.batch_sampler, self.start = batch_sampler, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        inner = self.batch_sampler
        (inner if hasattr(inner, "set_epoch") else inner.sampler).set_epoch(epoch)
        self.start = start

    def __iter__(self) -> Iterator[list[int]]:
        return itertools.islice(iter(self.batch_sampler), self.start, None)

    def __len__(self) -> int:
        return len(self.batch_sampler)


def set_epoch(loader: DataLoader, epoch: int, start: int = 0) -> None:
    """Before iterating `loader` for `epoch`: its batch order and augmentation for that epoch, from batch `start`."""
    loader.batch_sampler.set_epoch(epoch, start)
    if hasattr(loader.dataset, "set_epoch"):
        loader.dataset.set_epoch(epoch)
