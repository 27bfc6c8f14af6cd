"""`collate_samples`: the typed batch the loaders build, the same values as torch's collate."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import default_collate

from cnet_data.batch import Batch, Sample, collate_samples
from cnet_data.buckets import BucketConfig, BucketTable
from cnet_data.dataset import ControlNetDataset
from cnet_data.index import DatasetIndex


def _dataset(index: DatasetIndex) -> tuple[ControlNetDataset, list[int]]:
    table = BucketTable.from_config(BucketConfig(area=64 * 64, min_side=32, max_side=128, step=16))
    ids = table.assign(index.widths, index.heights)
    members = [int(i) for i in np.flatnonzero(ids == ids[0])]
    return ControlNetDataset(index, table, ids), members


def test_a_batch_holds_every_field_stacked(fill_index: DatasetIndex) -> None:
    dataset, members = _dataset(fill_index)
    samples = [dataset[i] for i in members[:3]]
    batch = collate_samples(samples)
    assert set(batch) == set(Batch.__annotations__) == set(Sample.__annotations__)
    reference = default_collate(samples)
    for name in ("image", "conditioning_image", "original_size", "crop_top_left", "target_size"):
        assert torch.equal(batch[name], reference[name]), name
    assert batch["image"].dtype == torch.float32 and batch["image"].shape[0] == 3
    assert batch["original_size"].dtype == torch.int64 and batch["target_size"].shape == (3, 2)
    assert batch["caption"] == [s["caption"] for s in samples]
    assert batch["caption_key"] == [s["caption_key"] for s in samples]
    assert batch["index"].tolist() == members[:3] and batch["index"].dtype == torch.int64
    assert batch["bucket"].tolist() == [samples[0]["bucket"]] * 3


def test_an_empty_or_mixed_batch_is_refused(fill_index: DatasetIndex) -> None:
    dataset, members = _dataset(fill_index)
    with pytest.raises(ValueError, match="no samples"):
        collate_samples([])
    other = next(i for i in range(len(dataset)) if dataset.bucket_ids[i] != dataset.bucket_ids[0])
    with pytest.raises(ValueError, match="several shapes"):
        collate_samples([dataset[members[0]], dataset[other]])
