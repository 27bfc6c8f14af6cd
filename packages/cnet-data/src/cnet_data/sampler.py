"""`BucketBatchSampler`: rank-aware batches from aspect-ratio buckets, exactly resumable.

How an epoch is laid out (a pure function of seed and epoch, the same on every rank):
1. A priority order of all samples: a seeded permutation (or index order without shuffle).
2. Each bucket's members in priority order, cut into global batches of `batch_size x world`
   samples. With `drop_last` a bucket's final partial global batch is left out of the epoch;
   without it, the batch is filled up by wrapping around to the bucket's first members.
3. The global batches, from all buckets, in a seeded order (or bucket by bucket).
Rank r takes slice r of every global batch, so at each step all ranks draw from one bucket and
every rank gets the same number of batches: no rank waits on a straggler, and DDP cannot hang on
an uneven count.

Resume: the state records, per "segment" of the epoch, the global batch size it ran with and how
many global batches it completed. Loading replays those segments to find which samples were
consumed; with the same global batch size the run continues with exactly the batches an
uninterrupted run would have drawn, and with another world size the samples not yet seen are
re-batched for the new size, so no sample is seen twice.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import numpy.typing as npt
import torch.distributed as dist
from torch.utils.data import Sampler
from typing_extensions import override

from cnet_data.buckets import merge_small_buckets

logger = logging.getLogger(__name__)

_STATE_VERSION = 1
IntArray = npt.NDArray[np.int64]


class BucketBatchSampler(Sampler[list[int]]):
    """Yields, for this rank, lists of dataset indices that all share one bucket.

    Args:
        bucket_ids: bucket id of every dataset index (as from `BucketTable.assign`).
        batch_size: samples per batch on each rank.
        seed: seed of the shuffles; must be the same on every rank.
        num_replicas: number of ranks; read from `torch.distributed` when not given.
        rank: this rank; read from `torch.distributed` when not given.
        shuffle: shuffle samples within buckets and batches across buckets.
        drop_last: leave out each bucket's last partial global batch (else pad it by wrapping).
        bucket_log_aspects: log aspect ratio per bucket id, to merge a small bucket into the one
            nearest in shape; without it the nearest id is taken (bucket tables sort ids by
            aspect).
    """

    def __init__(
        self,
        bucket_ids: Sequence[int] | npt.NDArray[np.integer],
        batch_size: int,
        *,
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
        shuffle: bool = True,
        drop_last: bool = True,
        bucket_log_aspects: Sequence[float] | npt.NDArray[np.floating] | None = None,
    ) -> None:
        super().__init__()
        self.num_replicas, self.rank = _resolve_rank(num_replicas, rank)
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.raw_bucket_ids: IntArray = np.asarray(bucket_ids, dtype=np.int64).copy()
        if self.raw_bucket_ids.ndim != 1:
            raise ValueError("bucket_ids must be one-dimensional")
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last
        self._log_aspects = None if bucket_log_aspects is None else np.asarray(bucket_log_aspects)
        self.global_batch_size = batch_size * self.num_replicas
        self.bucket_ids, self.merges = self._merged(self.global_batch_size)
        """Bucket id per sample after merging: the dataset must crop to these buckets."""
        self.epoch = 0
        # The iteration in progress (or the pending resume): earlier segments of the epoch as
        # (global batch size, batches done), and the batches already done in the current one.
        self._done_segments: list[tuple[int, int]] = []
        self._start = 0
        self._resume_pending = False
        self._position = 0
        self._plan_cache: tuple[tuple[object, ...], IntArray] | None = None
        self._report_epoch_shape()

    @property
    def dropped_per_epoch(self) -> int:
        """Samples left out of a fresh epoch (at most one partial global batch per bucket)."""
        if not self.drop_last:
            return 0
        counts = np.bincount(self.bucket_ids) if self.bucket_ids.size else np.zeros(0, np.int64)
        return int((counts % self.global_batch_size).sum())

    def set_epoch(self, epoch: int) -> None:
        """Start epoch `epoch` at its next iteration; the current epoch is a no-op (resume)."""
        if epoch != self.epoch:
            self.epoch = epoch
            self._resume_pending = False
            self._done_segments, self._start, self._position = [], 0, 0

    def remaining(self) -> int:
        """Batches this rank has yet to get in the current epoch (all of them on a fresh epoch;
        after `load_state_dict`, those the saved run had not consumed)."""
        if not self._resume_pending:
            return len(self)
        return len(self._plan()) - self._start

    def __len__(self) -> int:
        """Batches this rank gets in the current epoch, counting those done before a resume."""
        return sum(k for _, k in self._done_segments) + len(self._plan())

    @override
    def __iter__(self) -> Iterator[list[int]]:
        if not self._resume_pending:  # a fresh pass over the epoch
            self._done_segments, self._start = [], 0
        self._resume_pending = False
        plan = self._plan()
        lo, hi = self.rank * self.batch_size, (self.rank + 1) * self.batch_size
        self._position = self._start
        for row in plan[self._start :]:
            # Count before yielding: while the consumer holds a batch, it counts as consumed.
            self._position += 1
            yield row[lo:hi].tolist()

    def state_dict(self, consumed_batches: int | None = None) -> dict[str, object]:
        """The position in the global order, identical on every rank.

        `consumed_batches`, when given, is the number of batches the training loop has consumed
        since the current pass began (a resumed pass begins where the last one stopped): a
        DataLoader with workers draws batches ahead of the loop, so the loop's owner knows
        better than the count of batches this sampler has yielded.
        """
        position = self._position if consumed_batches is None else self._start + consumed_batches
        return {
            "version": _STATE_VERSION,
            "seed": self.seed,
            "epoch": self.epoch,
            "shuffle": self.shuffle,
            "drop_last": self.drop_last,
            "num_samples": int(self.raw_bucket_ids.size),
            "buckets_digest": self._buckets_digest(),
            "segments": [*map(list, self._done_segments), [self.global_batch_size, position]],
        }

    def load_state_dict(self, state: Mapping[str, object]) -> None:
        """Continue from `state` at the next iteration, on any number of ranks."""
        self._check_state(state)
        segments = [(int(g), int(k)) for g, k in state["segments"]]  # type: ignore[attr-defined]
        segments = [(g, k) for g, k in segments if k > 0]
        self.epoch = int(state["epoch"])  # type: ignore[call-overload]
        if segments and segments[-1][0] == self.global_batch_size:
            self._done_segments, self._start = segments[:-1], segments[-1][1]
        else:
            self._done_segments, self._start = segments, 0
        self._position = self._start
        self._resume_pending = True

    # -- internals ---------------------------------------------------------------------------

    def _plan(self) -> IntArray:
        """The current segment's global batches (rows), from the segment's first batch on."""
        key = (self.epoch, tuple(self._done_segments))
        if self._plan_cache is not None and self._plan_cache[0] == key:
            return self._plan_cache[1]
        pool = self._priority()
        for number, (size, done) in enumerate(self._done_segments):
            ids, _ = self._merged(size)
            consumed = self._layout(pool, ids, size, number)[:done]
            pool = pool[~np.isin(pool, consumed)]
        plan = self._layout(pool, self.bucket_ids, self.global_batch_size, len(self._done_segments))
        self._plan_cache = (key, plan)
        return plan

    def _priority(self) -> IntArray:
        n = self.raw_bucket_ids.size
        if not self.shuffle:
            return np.arange(n, dtype=np.int64)
        return np.random.default_rng([self.seed, self.epoch]).permutation(n).astype(np.int64)

    def _layout(self, pool: IntArray, ids: IntArray, size: int, segment: int) -> IntArray:
        """Global batches (one per row) of the samples in `pool`, kept in pool order per bucket."""
        buckets = ids[pool]
        order = np.argsort(buckets, kind="stable")
        grouped, grouped_buckets = pool[order], buckets[order]
        edges = np.flatnonzero(np.diff(grouped_buckets)) + 1
        rows = [self._rows(members, size) for members in np.split(grouped, edges) if members.size]
        plan = np.concatenate(rows) if rows else np.zeros((0, size), dtype=np.int64)
        if self.shuffle:
            rng = np.random.default_rng([self.seed, self.epoch, segment, 1])
            plan = plan[rng.permutation(len(plan))]
        return plan

    def _rows(self, members: IntArray, size: int) -> IntArray:
        full, rest = divmod(members.size, size)
        rows = members[: full * size].reshape(full, size)
        if rest and not self.drop_last:
            padded = np.concatenate([members[full * size :], np.resize(members, size - rest)])
            rows = np.concatenate([rows, padded[None, :]])
        return rows

    def _merged(self, global_batch_size: int) -> tuple[IntArray, dict[int, int]]:
        return merge_small_buckets(self.raw_bucket_ids, global_batch_size, self._log_aspects)

    def _buckets_digest(self) -> str:
        return hashlib.blake2b(self.raw_bucket_ids.tobytes(), digest_size=8).hexdigest()

    def _check_state(self, state: Mapping[str, object]) -> None:
        if state.get("version") != _STATE_VERSION:
            raise ValueError(
                f"bucket sampler state has version {state.get('version')}, expected "
                f"{_STATE_VERSION}"
            )
        expected = {
            "num_samples": int(self.raw_bucket_ids.size),
            "buckets_digest": self._buckets_digest(),
            "seed": self.seed,
            "shuffle": self.shuffle,
            "drop_last": self.drop_last,
        }
        for key, value in expected.items():
            if state.get(key) != value:
                raise ValueError(
                    f"bucket sampler state does not fit this sampler: {key} is "
                    f"{state.get(key)!r} in the state but {value!r} here (resume with the "
                    f"same dataset, buckets and sampler settings)"
                )

    def _report_epoch_shape(self) -> None:
        if self.merges:
            logger.info(
                "merged %d bucket(s) smaller than one global batch (%d) into neighbours: %s",
                len(self.merges),
                self.global_batch_size,
                self.merges,
            )
        dropped = self.dropped_per_epoch
        if dropped:
            logger.info(
                "each epoch leaves out %d of %d samples (partial global batches of %d)",
                dropped,
                self.raw_bucket_ids.size,
                self.global_batch_size,
            )


def _resolve_rank(num_replicas: int | None, rank: int | None) -> tuple[int, int]:
    initialized = dist.is_available() and dist.is_initialized()
    if num_replicas is None:
        num_replicas = dist.get_world_size() if initialized else 1
    if rank is None:
        rank = dist.get_rank() if initialized else 0
    if num_replicas < 1:
        raise ValueError(f"num_replicas must be at least 1, got {num_replicas}")
    if not 0 <= rank < num_replicas:
        raise ValueError(f"rank {rank} is outside [0, {num_replicas})")
    return num_replicas, rank
