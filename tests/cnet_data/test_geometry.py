from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from cnet_data.buckets import Bucket
from cnet_data.geometry import cover_size, plan_crop

sizes = st.integers(8, 5000)


@given(sizes, sizes, st.sampled_from([Bucket(64, 64), Bucket(1216, 832), Bucket(512, 2048)]))
def test_cover_resize_keeps_aspect_and_covers_the_bucket(h: int, w: int, bucket: Bucket) -> None:
    rh, rw = cover_size((h, w), bucket)
    assert rh >= bucket.height and rw >= bucket.width
    assert rh == bucket.height or rw == bucket.width  # tight on one side
    # aspect preserved up to rounding of one pixel
    assert abs(rw / rh - w / h) <= (1 / min(rh, rw)) * (w / h + 1) + 1e-9


@given(sizes, sizes, st.integers(0, 2**32 - 1), st.booleans())
def test_random_crops_stay_inside_the_resized_image(h: int, w: int, seed: int, flip: bool) -> None:
    bucket = Bucket(128, 96)
    plan = plan_crop((h, w), bucket, rng=np.random.default_rng(seed), flip_probability=float(flip))
    top, left = plan.crop_top_left
    rh, rw = plan.resized_size
    assert 0 <= top <= rh - 96 and 0 <= left <= rw - 128
    assert plan.target_size == (96, 128)
    assert plan.original_size == (h, w)
    assert plan.flip is flip
    box = plan.source_box()
    assert -1e-6 <= box[0] < box[2] <= w + 1e-6 and -1e-6 <= box[1] < box[3] <= h + 1e-6
    sdxl_top, sdxl_left = plan.sdxl_crop_top_left()
    assert sdxl_top == top
    assert sdxl_left == (rw - left - 128 if flip else left)


def test_validation_crops_are_centred_and_never_flipped() -> None:
    plan = plan_crop((200, 400), Bucket(64, 64), rng=None, flip_probability=1.0)
    assert plan.resized_size == (64, 128)
    assert plan.crop_top_left == (0, 32)
    assert not plan.flip
    assert plan.source_box() == pytest.approx((100.0, 0.0, 300.0, 200.0))
