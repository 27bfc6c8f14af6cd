"""A batch sampler's batches tagged with the epoch they were drawn in.

A DataLoader's persistent workers keep the copy of the dataset they were started with, so a
`set_epoch` on the main process's dataset never reaches them, and every later epoch would
repeat the first one's crops and flips. `EpochTagged` sends the epoch along with the indices
instead: each index becomes `(index, epoch)`, which `ControlNetDataset` draws from. The epoch
is read from the sampler as its pass begins, which is when the sampler draws its own order.
"""

from __future__ import annotations

from collections.abc import Iterator

from cnet_data.sampler import BucketBatchSampler


class EpochTagged:
    """`sampler`'s batches as lists of (index, epoch); length and `set_epoch` are the
    sampler's (Lightning calls `set_epoch` on a loader's batch sampler at each epoch)."""

    def __init__(self, sampler: BucketBatchSampler) -> None:
        self.sampler = sampler

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch = self.sampler.epoch
        for batch in self.sampler:
            yield [(i, epoch) for i in batch]

    def __len__(self) -> int:
        return len(self.sampler)

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)
