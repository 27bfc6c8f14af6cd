"""Cover-resize-then-crop geometry and the SDXL micro-conditioning values it implies.

Pure arithmetic, no image library: the dataset applies the plan to the image and to the
conditioning image alike, so the two can never disagree.
"""

from __future__ import annotations

import attrs
import numpy as np

from cnet_data.buckets import Bucket


@attrs.frozen
class CropPlan:
    """Where a bucket-sized crop comes from, in source and in resized coordinates.

    Sizes are (height, width) and offsets (top, left), the order SDXL's `add_time_ids` uses.
    """

    original_size: tuple[int, int]
    """Source image size (after EXIF orientation)."""
    resized_size: tuple[int, int]
    """Size after the cover resize: at least the bucket on both sides."""
    crop_top_left: tuple[int, int]
    """Crop offset in resized coordinates, as diffusers' SDXL pipelines expect it."""
    target_size: tuple[int, int]
    """The bucket size: what the model sees."""
    flip: bool
    """Mirror horizontally after cropping (image and conditioning together)."""

    def source_box(self) -> tuple[float, float, float, float]:
        """The crop in source pixel coordinates as (left, top, right, bottom), before the flip."""
        oh, ow = self.original_size
        rh, rw = self.resized_size
        sy, sx = oh / rh, ow / rw
        top, left = self.crop_top_left
        th, tw = self.target_size
        return (left * sx, top * sy, (left + tw) * sx, (top + th) * sy)

    def sdxl_crop_top_left(self) -> tuple[int, int]:
        """The crop offset to condition SDXL on: after a flip, measured from the mirrored side.

        A flipped crop is the crop that starts `resized_w - left - target_w` pixels from the left
        of the mirrored image, so that is the offset the model should be told.
        """
        top, left = self.crop_top_left
        if not self.flip:
            return (top, left)
        return (top, self.resized_size[1] - left - self.target_size[1])


def cover_size(original: tuple[int, int], bucket: Bucket) -> tuple[int, int]:
    """The smallest aspect-preserving (height, width) that covers the bucket on both sides."""
    oh, ow = original
    if oh <= 0 or ow <= 0:
        raise ValueError(f"image size must be positive, got {ow}x{oh}")
    scale = max(bucket.width / ow, bucket.height / oh)
    # Rounding can land one pixel short of the bucket; never go below it.
    return (max(bucket.height, round(oh * scale)), max(bucket.width, round(ow * scale)))


def plan_crop(
    original: tuple[int, int],
    bucket: Bucket,
    *,
    rng: np.random.Generator | None,
    flip_probability: float = 0.0,
) -> CropPlan:
    """Plan the cover resize and the crop of an image of size `original` (height, width).

    With `rng` the crop offset is uniform over the valid range and the flip is drawn with
    `flip_probability`; without it (validation) the crop is centred and nothing is flipped.
    """
    resized = cover_size(original, bucket)
    spare_h, spare_w = resized[0] - bucket.height, resized[1] - bucket.width
    if rng is None:
        top, left, flip = spare_h // 2, spare_w // 2, False
    else:
        top = int(rng.integers(0, spare_h + 1))
        left = int(rng.integers(0, spare_w + 1))
        flip = bool(rng.random() < flip_probability)
    return CropPlan(
        original_size=original,
        resized_size=resized,
        crop_top_left=(top, left),
        target_size=(bucket.height, bucket.width),
        flip=flip,
    )
