"""The training dataset: bucket-sized image and conditioning crops with SDXL size conditioning.

The image and its conditioning image share one crop plan (the same resize, crop and flip), so
they stay aligned pixel for pixel. Both are read through the index's store
(`DatasetIndex.store.open`), whatever kind of source the index was built from. Augmentation is
a pure function of (seed, epoch, index): a resumed run draws the same crops as an
uninterrupted one, in any worker process.
"""

from __future__ import annotations

import logging

import attrs
import numpy as np
import numpy.typing as npt
import torch
from PIL import Image
from torch.utils.data import Dataset
from typing_extensions import override

from cnet_data.batch import Sample
from cnet_data.buckets import BucketTable
from cnet_data.geometry import CropPlan, plan_crop
from cnet_data.imageio import DEFAULT_MAX_PIXELS, allow_pixels, load_cropped
from cnet_data.index import DatasetIndex

__all__ = ["AugmentConfig", "ControlNetDataset", "Sample", "SampleKey"]
"""`Sample` lives in `cnet_data.batch` with `Batch`; it stays importable from here."""

logger = logging.getLogger(__name__)

SampleKey = int | tuple[int, int]
"""A sample's index, or (index, epoch): the epoch its crop and flip are drawn for, carried with
the index to a loader's persistent workers (their copies of the dataset never see a later
`set_epoch`; `EpochTagged` tags a batch sampler's indices so)."""

_MAX_REPLACEMENTS = 16


@attrs.frozen
class AugmentConfig:
    """Paired augmentation applied to image and conditioning image alike."""

    random_crop: bool = True
    """Uniformly random crop offset in training; centred when False (and always in validation)."""
    flip_probability: float = 0.0
    """Chance of a horizontal flip in training. Off by default: some conditions (text, poses
    with a handedness) are not mirror-symmetric."""
    resample: str = "bilinear"
    """Pillow resampling filter for the resize: nearest, bilinear, bicubic or lanczos. Bilinear
    (antialiased, as Pillow always is when downscaling) is what diffusers' training scripts use,
    and half the cost of bicubic."""
    max_pixels: int = DEFAULT_MAX_PIXELS
    """The pixel limit the index enforced; Pillow is allowed to open images up to it."""
    variants: int = 0
    """0: a fresh crop and flip for every sample in every epoch. N >= 1: the draws repeat every N
    epochs (epoch e draws as epoch e mod N), so each sample has N fixed variants, which a latent
    cache (`cnet-train encode`) can hold. 1 with random crops off and no flips: one variant."""

    @property
    def fixed(self) -> bool:
        """Whether every epoch crops (centred) and flips (never) every sample alike."""
        return not self.random_crop and self.flip_probability == 0.0

    def __attrs_post_init__(self) -> None:
        if self.variants < 0:
            raise ValueError(f"variants must be 0 or more, got {self.variants}")
        if not 0.0 <= self.flip_probability <= 1.0:
            raise ValueError(f"flip_probability must be in [0, 1], got {self.flip_probability}")
        if self.resample not in _RESAMPLE:
            raise ValueError(
                f"resample must be one of {', '.join(_RESAMPLE)}, got {self.resample!r}"
            )


_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}


class ControlNetDataset(Dataset[Sample]):
    """Samples of an index, each cropped to its bucket.

    `bucket_ids` must be the sampler's (`BucketBatchSampler.bucket_ids`, after small buckets
    are merged) so that every batch the sampler forms has one size. A sample that fails to
    decode although the index accepted it (the file changed since) is logged and replaced by
    the next sample of the same bucket, so a long run never dies on one file.
    """

    def __init__(
        self,
        index: DatasetIndex,
        table: BucketTable,
        bucket_ids: npt.NDArray[np.integer],
        *,
        train: bool = True,
        augment: AugmentConfig = AugmentConfig(),
        seed: int = 0,
    ) -> None:
        if len(bucket_ids) != len(index):
            raise ValueError(
                f"bucket_ids has {len(bucket_ids)} entries but the index has {len(index)} samples"
            )
        self.index = index
        self.table = table
        self.bucket_ids = np.asarray(bucket_ids, dtype=np.int64)
        self.train = train
        self.augment = augment
        self.seed = seed
        self.epoch = 0
        self.replaced = 0
        """Samples this process replaced because they failed to decode."""
        allow_pixels(augment.max_pixels)

    def set_epoch(self, epoch: int) -> None:
        """Crops and flips are drawn per (seed, epoch, index)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.index)

    @override
    def __getitem__(self, key: SampleKey) -> Sample:
        i, epoch = key if isinstance(key, tuple) else (key, self.epoch)
        candidate = i
        for _ in range(_MAX_REPLACEMENTS):
            try:
                return self._load(candidate, epoch)
            except Exception as exc:  # whatever one broken file raises must not end the run
                self._note_failure(candidate, exc)
            candidate = self._next_in_bucket(candidate)
        raise RuntimeError(
            f"{_MAX_REPLACEMENTS} samples in a row failed to decode near index {i} (bucket "
            f"{self.bucket_ids[i]}); the dataset changed since it was indexed: re-run "
            f"`cnet-data index`"
        )

    @property
    def variant(self) -> int:
        """The augmentation variant the current epoch draws (`variant_of`)."""
        return self.variant_of(self.epoch)

    def variant_of(self, epoch: int) -> int:
        """The augmentation variant epoch `epoch` draws: the epoch itself when every epoch
        draws afresh; 0 when nothing is drawn (validation, fixed augmentation)."""
        if not self.train or self.augment.fixed:
            return 0
        return epoch % self.augment.variants if self.augment.variants else epoch

    def plan(self, i: int, epoch: int | None = None) -> CropPlan:
        """The crop plan of sample `i` in epoch `epoch` (None: the current one)."""
        bucket = self.table[int(self.bucket_ids[i])]
        h, w = (int(v) for v in self.index.sizes[i])
        if not self.train:
            return plan_crop((h, w), bucket, rng=None)
        variant = self.variant_of(self.epoch if epoch is None else epoch)
        rng = np.random.default_rng([self.seed, variant, i])
        plan = plan_crop((h, w), bucket, rng=rng, flip_probability=self.augment.flip_probability)
        if not self.augment.random_crop:
            centred = plan_crop((h, w), bucket, rng=None)
            plan = attrs.evolve(centred, flip=plan.flip)
        return plan

    def _load(self, i: int, epoch: int) -> Sample:
        entry = self.index[i]
        plan = self.plan(i, epoch)
        image = _to_tensor(self._load_member(entry.image, plan))
        cond = _to_tensor(self._load_member(entry.conditioning, plan))
        return Sample(
            image=image.mul_(2.0 / 255.0).sub_(1.0),
            conditioning_image=cond.mul_(1.0 / 255.0),
            caption=entry.caption,
            caption_key=entry.caption_key,
            original_size=torch.tensor(plan.original_size, dtype=torch.int64),
            crop_top_left=torch.tensor(plan.sdxl_crop_top_left(), dtype=torch.int64),
            target_size=torch.tensor(plan.target_size, dtype=torch.int64),
            bucket=int(self.bucket_ids[i]),
            index=i,
            variant=self.variant_of(epoch),
        )

    def _load_member(self, reference: str, plan: CropPlan) -> Image.Image:
        with self.index.store.open(reference) as fh:
            return load_cropped(fh, plan, resample=_RESAMPLE[self.augment.resample])

    def _note_failure(self, i: int, exc: Exception) -> None:
        self.replaced += 1
        logger.warning(
            "sample %d (%s) failed to decode and is replaced by another of its bucket: %s",
            i,
            self.index.store.describe(self.index[i].image),
            exc,
        )

    def _next_in_bucket(self, i: int) -> int:
        members = np.flatnonzero(self.bucket_ids == self.bucket_ids[i])
        position = int(np.searchsorted(members, i))
        return int(members[(position + 1) % members.size])


def _to_tensor(img: Image.Image) -> torch.Tensor:
    """float32 (3, H, W) with values 0..255, contiguous."""
    hwc = torch.from_numpy(np.asarray(img).copy())
    # One pass: the dtype conversion also makes the channels-first layout contiguous.
    return hwc.permute(2, 0, 1).to(torch.float32, memory_format=torch.contiguous_format)
