"""Aspect-ratio buckets: generation, assignment and merging of buckets too small to batch.

Buckets are generated the NovelAI way: walk one side from the minimum to the maximum in steps,
give the other side the largest multiple of the step that keeps the area within the target, do
the same with the roles swapped, deduplicate, and add the square. Bucket ids are ordered by aspect
ratio (width / height, ascending), so neighbouring ids are neighbouring shapes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import attrs
import numpy as np
import numpy.typing as npt


@attrs.frozen
class BucketConfig:
    """How the bucket table is generated."""

    area: int = 1024 * 1024
    """Target pixel area; no bucket exceeds it."""
    min_side: int = 512
    """Smallest side length in pixels."""
    max_side: int = 2048
    """Largest side length in pixels."""
    step: int = 64
    """Every side is a multiple of this (64 keeps SDXL latents divisible by 8)."""

    def __attrs_post_init__(self) -> None:
        if self.step <= 0:
            raise ValueError(f"buckets.step must be positive, got {self.step}")
        if self.min_side <= 0 or self.min_side % self.step:
            raise ValueError(
                f"buckets.min_side must be a positive multiple of step {self.step}, "
                f"got {self.min_side}"
            )
        if self.max_side < self.min_side or self.max_side % self.step:
            raise ValueError(
                f"buckets.max_side must be a multiple of step {self.step} and at least "
                f"min_side {self.min_side}, got {self.max_side}"
            )
        if self.area < self.min_side * self.min_side:
            raise ValueError(
                f"buckets.area {self.area} is smaller than a min_side square "
                f"({self.min_side}x{self.min_side})"
            )

    @classmethod
    def for_resolution(cls, resolution: int, step: int = 64) -> BucketConfig:
        """Buckets for a model trained at `resolution` x `resolution`: that area, sides from
        half the resolution to twice it (rounded down to `step`). For 1024 this is the class's
        own default (SDXL's); the example configs use it for 512 (SD 1.5) and 768 (SD 2.1)."""
        if resolution < step:
            raise ValueError(f"resolution {resolution} is smaller than the step {step}")
        min_side = max(step, resolution // 2 // step * step)
        max_side = 2 * resolution // step * step
        return cls(area=resolution * resolution, min_side=min_side, max_side=max_side, step=step)


@attrs.frozen
class BucketSettings:
    """`data.buckets` as a training config writes it: the keys it sets, each left out (None)
    taking the base model family's default (`cnet_data.run_config.resolve_buckets` fills them).
    A config must be able to say "not set" apart from "set to the default": the default table
    is SDXL's, four times the pixels SD 1.5 trains at."""

    area: int | None = None
    """Target pixel area; None: the family's resolution squared."""
    min_side: int | None = None
    """Smallest side length in pixels; None: the family's default (half its resolution)."""
    max_side: int | None = None
    """Largest side length in pixels; None: the family's default (twice its resolution)."""
    step: int | None = None
    """Every side is a multiple of this; None: 64."""

    def __attrs_post_init__(self) -> None:
        for name, value in self.given().items():
            if value <= 0:
                raise ValueError(f"buckets.{name} must be positive, got {value}")
        if len(self.given()) == len(attrs.fields(BucketConfig)):
            BucketConfig(**self.given())  # every key set: the table is known without a family

    def given(self) -> dict[str, int]:
        """The keys that are set, with their values."""
        return {k: v for k, v in attrs.asdict(self).items() if v is not None}


def bucket_settings(settings: BucketSettings | BucketConfig) -> BucketSettings:
    """`settings` as is, or a `BucketConfig` as the settings with every key set (what a config
    that writes all four keys holds): a field's converter, so code may pass either."""
    if isinstance(settings, BucketSettings):
        return settings
    return BucketSettings(**attrs.asdict(settings))


FAMILY_RESOLUTIONS = {"sd15": 512, "sd21": 768, "sdxl": 1024}
"""Side of the square resolution each model family's base model was trained at (what
`cnet_models.families.Family.default_resolution` says; cnet-data cannot import it). SD 2.1 also
comes as a 512 variant, told apart by its UNet's `sample_size` (64 latents, not 96)."""


@attrs.frozen
class Bucket:
    """One training resolution."""

    width: int
    height: int

    @property
    def aspect(self) -> float:
        return self.width / self.height


def generate_buckets(config: BucketConfig) -> tuple[Bucket, ...]:
    """The bucket table for `config`, ordered by aspect ratio (width / height) ascending."""
    step = config.step
    shapes: set[tuple[int, int]] = set()
    for side in range(config.min_side, config.max_side + 1, step):
        other = min(config.max_side, (config.area // side) // step * step)
        if other >= config.min_side:
            shapes.add((side, other))
            shapes.add((other, side))
    square = min(config.max_side, math.isqrt(config.area) // step * step)
    shapes.add((square, square))
    ordered = sorted(shapes, key=lambda wh: (wh[0] / wh[1], wh[0]))
    return tuple(Bucket(w, h) for w, h in ordered)


class BucketTable:
    """A fixed set of buckets and the nearest-aspect assignment of image sizes to them."""

    def __init__(self, buckets: Sequence[Bucket]) -> None:
        if not buckets:
            raise ValueError("a bucket table needs at least one bucket")
        self.buckets = tuple(buckets)
        self._log_aspects = np.log(np.array([b.aspect for b in self.buckets], dtype=np.float64))

    @classmethod
    def from_config(cls, config: BucketConfig) -> BucketTable:
        return cls(generate_buckets(config))

    def __len__(self) -> int:
        return len(self.buckets)

    def __getitem__(self, bucket_id: int) -> Bucket:
        return self.buckets[bucket_id]

    @property
    def log_aspects(self) -> npt.NDArray[np.float64]:
        return self._log_aspects

    def assign(self, widths: npt.ArrayLike, heights: npt.ArrayLike) -> npt.NDArray[np.int64]:
        """Bucket id per image: the bucket nearest in log aspect ratio (ties go to the lower id)."""
        w = np.asarray(widths, dtype=np.float64)
        h = np.asarray(heights, dtype=np.float64)
        if w.shape != h.shape:
            raise ValueError(f"widths {w.shape} and heights {h.shape} differ in shape")
        if np.any(w <= 0) or np.any(h <= 0):
            raise ValueError("image sizes must be positive")
        log_aspect = np.log(w / h)
        # Buckets are sorted by aspect, so a binary search finds the two neighbours.
        right = np.clip(np.searchsorted(self._log_aspects, log_aspect), 1, len(self) - 1)
        if len(self) == 1:
            return np.zeros(w.shape, dtype=np.int64)
        left = right - 1
        take_left = (log_aspect - self._log_aspects[left]) <= (
            self._log_aspects[right] - log_aspect
        )
        return np.where(take_left, left, right).astype(np.int64)


def merge_small_buckets(
    bucket_ids: npt.ArrayLike,
    min_count: int,
    log_aspects: npt.ArrayLike | None = None,
) -> tuple[npt.NDArray[np.int64], dict[int, int]]:
    """Fold every bucket with fewer than `min_count` samples into its nearest populated bucket.

    Nearest is by log aspect ratio when `log_aspects` (indexed by bucket id) is given, else by id
    distance (bucket tables order ids by aspect). Ties go to the bucket with more samples, then to
    the lower id. The smallest bucket is folded first and counts are updated after each fold, so
    two small neighbours can together reach the threshold. Returns the remapped ids and the map
    {old id: final id} of every bucket that was folded.
    """
    ids = np.asarray(bucket_ids, dtype=np.int64)
    if ids.size and ids.min() < 0:
        raise ValueError("bucket ids must be non-negative")
    if min_count < 1:
        raise ValueError(f"min_count must be at least 1, got {min_count}")
    counts = np.bincount(ids, minlength=0) if ids.size else np.zeros(0, dtype=np.int64)
    if log_aspects is None:
        position = np.arange(counts.size, dtype=np.float64)
    else:
        position = np.asarray(log_aspects, dtype=np.float64)
        if position.size < counts.size:
            raise ValueError(
                f"log_aspects has {position.size} entries but bucket ids reach {counts.size - 1}"
            )
    target = np.arange(counts.size)
    alive = counts > 0
    while alive.sum() > 1:
        small = np.flatnonzero(alive & (counts < min_count))
        if small.size == 0:
            break
        src = int(small[np.argmin(counts[small])])
        candidates = np.flatnonzero(alive)
        candidates = candidates[candidates != src]
        distance = np.abs(position[candidates] - position[src])
        # lexsort: last key is primary -> nearest, then most samples, then lowest id.
        dst = int(candidates[np.lexsort((candidates, -counts[candidates], distance))[0]])
        counts[dst] += counts[src]
        counts[src] = 0
        alive[src] = False
        target[target == src] = dst
    merged = {int(b): int(target[b]) for b in range(counts.size) if target[b] != b}
    return target[ids] if ids.size else ids, merged
