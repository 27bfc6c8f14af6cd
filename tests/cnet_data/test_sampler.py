"""BucketBatchSampler: properties over random layouts, world sizes and resumes."""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cnet_data.sampler import BucketBatchSampler

Batches = list[list[int]]


def _ranks(ids: np.ndarray, batch: int, world: int, **kw: Any) -> list[BucketBatchSampler]:
    return [BucketBatchSampler(ids, batch, num_replicas=world, rank=r, **kw) for r in range(world)]


def _run(samplers: list[BucketBatchSampler], steps: int | None = None) -> list[Batches]:
    """Each rank's batches, taking at most `steps` from each."""
    out = []
    for s in samplers:
        it = iter(s)
        out.append(
            [b for _, b in zip(range(steps if steps is not None else 10**9), it, strict=False)]
        )
    return out


layouts = st.builds(
    lambda n, k, seed: np.random.default_rng(seed).integers(0, k, size=n),
    st.integers(1, 250),
    st.integers(1, 8),
    st.integers(0, 1000),
)


@settings(max_examples=150, deadline=None)
@given(
    layouts, st.integers(1, 8), st.integers(1, 6), st.integers(0, 99), st.booleans(), st.booleans()
)
def test_epoch_properties(
    ids: np.ndarray, world: int, batch: int, seed: int, shuffle: bool, drop_last: bool
) -> None:
    samplers = _ranks(ids, batch, world, seed=seed, shuffle=shuffle, drop_last=drop_last)
    per_rank = _run(samplers)
    merged = samplers[0].bucket_ids
    # equal counts per rank, equal to len()
    assert len({len(b) for b in per_rank}) == 1
    assert all(len(s) == len(per_rank[0]) for s in samplers)
    for step in zip(*per_rank, strict=True):
        assert all(len(b) == batch for b in step)
        buckets = {int(merged[i]) for b in step for i in b}
        assert len(buckets) == 1  # one bucket per step across ranks
    flat = [i for rank in per_rank for b in rank for i in b]
    counts = Counter(flat)
    global_batch = batch * world
    if drop_last:
        assert max(counts.values(), default=1) == 1  # disjoint across ranks and steps
        unseen = set(range(len(ids))) - set(counts)
        assert len(unseen) == samplers[0].dropped_per_epoch
        for bucket, missing in Counter(int(merged[i]) for i in unseen).items():
            assert missing < global_batch, bucket
    else:
        assert set(counts) == set(range(len(ids)))  # every sample, padding only repeats
        assert sum(counts.values()) - len(ids) < global_batch * len(set(merged.tolist()))
    # determinism: the same arguments give the same batches on every construction
    assert (
        _run(_ranks(ids, batch, world, seed=seed, shuffle=shuffle, drop_last=drop_last)) == per_rank
    )


@settings(max_examples=150, deadline=None)
@given(
    layouts,
    st.integers(1, 8),
    st.integers(1, 8),
    st.integers(1, 5),
    st.integers(0, 99),
    st.floats(0, 1),
    st.booleans(),
)
def test_resume_continues_exactly(
    ids: np.ndarray, world: int, new_world: int, batch: int, seed: int, stop: float, shuffle: bool
) -> None:
    full = _run(_ranks(ids, batch, world, seed=seed, shuffle=shuffle))
    k = round(stop * len(full[0]))
    first = _ranks(ids, batch, world, seed=seed, shuffle=shuffle)
    before = _run(first, k)
    state = first[0].state_dict()
    assert all(s.state_dict() == state for s in first)  # identical on every rank

    # Same world size: exactly the rest of the uninterrupted epoch.
    again = _ranks(ids, batch, world, seed=seed, shuffle=shuffle)
    for s in again:
        s.load_state_dict(state)
    after = _run(again)
    assert [b + a for b, a in zip(before, after, strict=True)] == full
    assert all(len(s) == len(full[0]) for s in again)

    # Another world size: nothing seen twice, nothing skipped beyond one partial global batch
    # per bucket of the new size.
    other = _ranks(ids, batch, new_world, seed=seed, shuffle=shuffle)
    for s in other:
        s.load_state_dict(state)
    rest = _run(other)
    assert len({len(r) for r in rest}) == 1
    seen = [i for rank in before + rest for b in rank for i in b]
    assert len(seen) == len(set(seen))
    unseen = set(range(len(ids))) - set(seen)
    merged = other[0].bucket_ids
    for missing in Counter(int(merged[i]) for i in unseen).values():
        assert missing < batch * new_world


def test_chained_resumes_across_three_world_sizes() -> None:
    ids = np.random.default_rng(5).integers(0, 4, size=400)
    seen: list[int] = []
    state = None
    for world, steps in ((2, 5), (3, 4), (1, None)):
        samplers = _ranks(ids, 4, world, seed=11)
        if state is not None:
            for s in samplers:
                s.load_state_dict(state)
        seen += [i for rank in _run(samplers, steps) for b in rank for i in b]
        state = samplers[0].state_dict()
    assert len(seen) == len(set(seen))
    assert len(ids) - len(seen) < 4 * 4  # at most one partial batch of 4 per bucket


def test_epochs_differ_and_set_epoch_keeps_a_pending_resume() -> None:
    ids = np.zeros(64, dtype=np.int64)
    s = BucketBatchSampler(ids, 4, num_replicas=1, rank=0, seed=0)
    epoch0 = list(s)
    s.set_epoch(1)
    epoch1 = list(s)
    assert epoch0 != epoch1
    assert sorted(map(sorted, epoch0)) != sorted(map(sorted, epoch1))
    it = iter(s)
    next(it), next(it)
    state = s.state_dict()
    fresh = BucketBatchSampler(ids, 4, num_replicas=1, rank=0, seed=0)
    fresh.load_state_dict(state)
    fresh.set_epoch(1)  # what a trainer does on resume: must not discard the position
    assert list(fresh) == epoch1[2:]
    assert list(fresh) == epoch1  # the next pass starts the epoch afresh


def test_state_consumed_override_for_prefetching_loaders() -> None:
    ids = np.zeros(40, dtype=np.int64)
    s = BucketBatchSampler(ids, 2, num_replicas=1, rank=0)
    batches = list(s)  # a prefetching loader may have drawn everything
    state = s.state_dict(consumed_batches=3)
    resumed = BucketBatchSampler(ids, 2, num_replicas=1, rank=0)
    resumed.load_state_dict(state)
    it = iter(resumed)
    assert [next(it) for _ in range(5)] == batches[3:8]  # drawn ahead of the loop
    again = BucketBatchSampler(ids, 2, num_replicas=1, rank=0)
    again.load_state_dict(resumed.state_dict(consumed_batches=2))  # counted from the resume
    assert list(again) == batches[5:]


def test_without_shuffle_the_order_is_index_order_per_bucket() -> None:
    ids = np.array([1, 0, 1, 0, 1, 0, 1, 0])
    s = BucketBatchSampler(ids, 2, num_replicas=1, rank=0, shuffle=False)
    assert list(s) == [[1, 3], [5, 7], [0, 2], [4, 6]]


def test_small_buckets_are_merged_and_reported() -> None:
    ids = np.array([0] * 20 + [1] * 3 + [2] * 20)
    s = BucketBatchSampler(
        ids, 2, num_replicas=2, rank=0, bucket_log_aspects=np.log([0.5, 0.95, 1.0])
    )
    assert s.merges == {1: 2}
    assert set(s.bucket_ids.tolist()) == {0, 2}
    assert s.dropped_per_epoch == 0 + 3  # 20 % 4 == 0, 23 % 4 == 3


def test_bad_arguments_and_foreign_state_are_refused() -> None:
    ids = np.zeros(10, dtype=np.int64)
    with pytest.raises(ValueError, match="rank 2 is outside"):
        BucketBatchSampler(ids, 2, num_replicas=2, rank=2)
    with pytest.raises(ValueError, match="batch_size"):
        BucketBatchSampler(ids, 0, num_replicas=1, rank=0)
    state = BucketBatchSampler(ids, 2, num_replicas=1, rank=0).state_dict()
    other = BucketBatchSampler(np.zeros(12, dtype=np.int64), 2, num_replicas=1, rank=0)
    with pytest.raises(ValueError, match="num_samples is 10 in the state but 12 here"):
        other.load_state_dict(state)
    reseeded = BucketBatchSampler(ids, 2, num_replicas=1, rank=0, seed=9)
    with pytest.raises(ValueError, match="seed"):
        reseeded.load_state_dict(state)


def test_reads_world_from_torch_distributed_when_initialised() -> None:
    s = BucketBatchSampler(np.zeros(8, dtype=np.int64), 2)
    assert (s.num_replicas, s.rank) == (1, 0)
