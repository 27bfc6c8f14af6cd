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
    """`sampler`'s batches as lists of (index, epoch), and its length.

    The sampler is kept under a private name on purpose: Lightning calls `set_epoch` on a
    loader's `batch_sampler.sampler` when it finds one, and the sampler's epoch is its owner's
    to set (a resume restores it, which such a call would undo)."""

    def __init__(self, sampler: BucketBatchSampler) -> None:
        self._sampler = sampler

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch = self._sampler.epoch
        for batch in self._sampler:
            yield [(i, epoch) for i in batch]

    def __len__(self) -> int:
        return len(self._sampler)
