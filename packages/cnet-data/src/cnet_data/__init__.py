"""cnet-data: buckets, the bucket batch sampler, the paired dataset and embedding caches.

Importing the package is cheap: the public names below load their modules (and torch) only
when first used, so `cnet-data --help` and the index tools start fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_EXPORTS = {
    "Bucket": "cnet_data.buckets",
    "BucketConfig": "cnet_data.buckets",
    "BucketTable": "cnet_data.buckets",
    "generate_buckets": "cnet_data.buckets",
    "merge_small_buckets": "cnet_data.buckets",
    "CropPlan": "cnet_data.geometry",
    "plan_crop": "cnet_data.geometry",
    "DatasetIndex": "cnet_data.index",
    "IndexBuilder": "cnet_data.index",
    "SourceConfig": "cnet_data.sources",
    "ScanConfig": "cnet_data.scan",
    "ScanReport": "cnet_data.scan",
    "BadSamplesError": "cnet_data.scan",
    "scan": "cnet_data.scan",
    "AugmentConfig": "cnet_data.dataset",
    "ControlNetDataset": "cnet_data.dataset",
    "Sample": "cnet_data.dataset",
    "BucketBatchSampler": "cnet_data.sampler",
    "caption_key": "cnet_data.captions",
}

__all__ = [
    "AugmentConfig",
    "BadSamplesError",
    "Bucket",
    "BucketBatchSampler",
    "BucketConfig",
    "BucketTable",
    "ControlNetDataset",
    "CropPlan",
    "DatasetIndex",
    "IndexBuilder",
    "Sample",
    "ScanConfig",
    "ScanReport",
    "SourceConfig",
    "__version__",
    "caption_key",
    "generate_buckets",
    "merge_small_buckets",
    "plan_crop",
    "scan",
]

if TYPE_CHECKING:
    from cnet_data.buckets import (
        Bucket,
        BucketConfig,
        BucketTable,
        generate_buckets,
        merge_small_buckets,
    )
    from cnet_data.captions import caption_key
    from cnet_data.dataset import AugmentConfig, ControlNetDataset, Sample
    from cnet_data.geometry import CropPlan, plan_crop
    from cnet_data.index import DatasetIndex, IndexBuilder
    from cnet_data.sampler import BucketBatchSampler
    from cnet_data.scan import BadSamplesError, ScanConfig, ScanReport, scan
    from cnet_data.sources import SourceConfig


def __getattr__(name: str) -> object:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'cnet_data' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
