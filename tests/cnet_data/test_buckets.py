from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from cnet_data.buckets import (
    Bucket,
    BucketConfig,
    BucketTable,
    generate_buckets,
    merge_small_buckets,
)


def test_default_buckets_follow_the_novelai_rule() -> None:
    config = BucketConfig()
    buckets = generate_buckets(config)
    shapes = {(b.width, b.height) for b in buckets}
    assert (1024, 1024) in shapes
    # Known SDXL-style members for a 1024^2 area in steps of 64, both orientations.
    for w, h in [(1216, 832), (832, 1216), (1344, 768), (768, 1344), (2048, 512), (512, 2048)]:
        assert (w, h) in shapes
    for b in buckets:
        assert b.width * b.height <= config.area
        assert b.width % 64 == 0 and b.height % 64 == 0
        assert min(b.width, b.height) >= 512 and max(b.width, b.height) <= 2048
        # Maximal: one more step on the derived side would exceed the area (square excepted).
        if b.width != b.height:
            long_side, short_side = max(b.width, b.height), min(b.width, b.height)
            assert (short_side + 64) * long_side > config.area or short_side + 64 > 2048
    aspects = [b.aspect for b in buckets]
    assert aspects == sorted(aspects)
    assert len(shapes) == len(buckets)


def test_bucket_config_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="min_side"):
        BucketConfig(min_side=500)
    with pytest.raises(ValueError, match="max_side"):
        BucketConfig(min_side=512, max_side=256)
    with pytest.raises(ValueError, match="area"):
        BucketConfig(area=100)


@given(
    st.lists(st.integers(16, 8000), min_size=1, max_size=40),
    st.lists(st.integers(16, 8000), min_size=1, max_size=40),
)
def test_assignment_picks_the_nearest_log_aspect(widths: list[int], heights: list[int]) -> None:
    n = min(len(widths), len(heights))
    w, h = np.array(widths[:n]), np.array(heights[:n])
    table = BucketTable.from_config(BucketConfig())
    ids = table.assign(w, h)
    for wi, hi, bid in zip(w, h, ids, strict=True):
        distances = [abs(math.log(wi / hi) - math.log(b.aspect)) for b in table.buckets]
        assert distances[bid] == pytest.approx(min(distances), abs=1e-12)


def test_assignment_validates_input() -> None:
    table = BucketTable([Bucket(64, 64)])
    assert table.assign([10, 99], [20, 1]).tolist() == [0, 0]
    with pytest.raises(ValueError, match="positive"):
        table.assign([0], [10])


def test_small_buckets_merge_into_the_nearest_shape() -> None:
    log_aspects = np.log([0.5, 0.9, 1.0, 2.0])
    ids = np.array([0] * 10 + [1] * 2 + [2] * 10 + [3] * 3)
    merged, merges = merge_small_buckets(ids, 4, log_aspects)
    assert merges == {1: 2, 3: 2}
    assert np.bincount(merged).tolist() == [10, 0, 15]
    # Without aspects, neighbours by id.
    _, by_id = merge_small_buckets(ids, 4)
    assert by_id == {1: 0, 3: 2}  # tie between 0 and 2: same count, lower id wins


def test_two_small_neighbours_can_merge_into_each_other() -> None:
    ids = np.array([0] * 3 + [1] * 3)
    merged, merges = merge_small_buckets(ids, 5)
    assert len(set(merged.tolist())) == 1
    assert len(merges) == 1


@given(
    st.lists(st.integers(0, 9), min_size=1, max_size=200),
    st.integers(1, 40),
)
def test_merging_preserves_samples_and_fills_buckets(ids: list[int], min_count: int) -> None:
    merged, merges = merge_small_buckets(np.array(ids), min_count)
    counts = np.bincount(merged)
    populated = counts[counts > 0]
    assert populated.sum() == len(ids)
    # Either every remaining bucket is big enough, or everything collapsed into one.
    assert populated.size == 1 or (populated >= min_count).all()
    for src, dst in merges.items():
        assert src not in merged.tolist()
        assert dst not in merges
