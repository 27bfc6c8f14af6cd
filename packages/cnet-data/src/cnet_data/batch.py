"""The data -> train contract: one `Sample` from the dataset, one `Batch` from `collate_samples`.

Every batch the training loop, the control gain and the benchmarks see is a `Batch`: built by
`collate_samples` from the dataset's samples (or from samples made by hand, as the benchmarks
do), so the keys, shapes and ranges are written down once, here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, TypedDict

import torch
from torch.utils.data import default_collate


class Sample(TypedDict):
    """One training sample, what `ControlNetDataset` returns."""

    image: torch.Tensor
    """float32 (3, H, W) in [-1, 1]: what the VAE encodes."""
    conditioning_image: torch.Tensor
    """float32 (3, H, W) in [0, 1]: what diffusers' ControlNet pipelines feed at inference."""
    caption: str
    caption_key: str
    """Hex key of the caption in the embedding cache."""
    original_size: torch.Tensor
    """int64 (2,): source (height, width), SDXL micro-conditioning."""
    crop_top_left: torch.Tensor
    """int64 (2,): crop (top, left) in resized coordinates, SDXL micro-conditioning."""
    target_size: torch.Tensor
    """int64 (2,): bucket (height, width), SDXL micro-conditioning."""
    bucket: int
    """The bucket's number in the run's `BucketTable`."""
    index: int
    """The dataset index of the sample actually returned (see `ControlNetDataset`)."""
    variant: int
    """The augmentation variant its crop and flip were drawn as (`AugmentConfig.variants`)."""


class Batch(TypedDict):
    """B samples of one bucket (one H, W), stacked; what the training step consumes."""

    image: torch.Tensor
    """float32 (B, 3, H, W) in [-1, 1]: what the VAE encodes."""
    conditioning_image: torch.Tensor
    """float32 (B, 3, H, W) in [0, 1]: the ControlNet's condition."""
    caption: list[str]
    """B captions, for a text encoder run online."""
    caption_key: list[str]
    """B hex keys (32 characters) of the captions in the embedding cache."""
    original_size: torch.Tensor
    """int64 (B, 2): source (height, width), SDXL micro-conditioning."""
    crop_top_left: torch.Tensor
    """int64 (B, 2): crop (top, left) in resized coordinates, SDXL micro-conditioning."""
    target_size: torch.Tensor
    """int64 (B, 2): bucket (height, width), SDXL micro-conditioning."""
    bucket: torch.Tensor
    """int64 (B,): each sample's bucket number (all equal in a sampler's batch)."""
    index: torch.Tensor
    """int64 (B,): each sample's dataset index."""
    variant: torch.Tensor
    """int64 (B,): each sample's augmentation variant (the key of its cached latents)."""


_TensorField = Literal[
    "image", "conditioning_image", "original_size", "crop_top_left", "target_size"
]


def collate_samples(samples: Sequence[Sample]) -> Batch:
    """The samples, of one size, as one `Batch` (the `collate_fn` of every cnet loader)."""
    if not samples:
        raise ValueError("collate_samples got no samples; a batch holds at least one")
    shapes = {tuple(s["image"].shape) for s in samples}
    if len(shapes) > 1:
        raise ValueError(
            f"collate_samples got images of several shapes {sorted(shapes)}; a batch comes "
            "from one bucket (use the bucket sampler)"
        )
    return Batch(
        image=_stacked(samples, "image"),
        conditioning_image=_stacked(samples, "conditioning_image"),
        caption=[s["caption"] for s in samples],
        caption_key=[s["caption_key"] for s in samples],
        original_size=_stacked(samples, "original_size"),
        crop_top_left=_stacked(samples, "crop_top_left"),
        target_size=_stacked(samples, "target_size"),
        bucket=torch.tensor([s["bucket"] for s in samples], dtype=torch.int64),
        index=torch.tensor([s["index"] for s in samples], dtype=torch.int64),
        variant=torch.tensor([s["variant"] for s in samples], dtype=torch.int64),
    )


def _stacked(samples: Sequence[Sample], name: _TensorField) -> torch.Tensor:
    # default_collate stacks into shared memory inside a DataLoader worker, so the batch
    # reaches the main process without another copy.
    stacked = default_collate([s[name] for s in samples])
    assert isinstance(stacked, torch.Tensor)
    return stacked
