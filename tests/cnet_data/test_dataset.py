"""The dataset: value ranges, identical geometry for image and condition, SDXL values."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from cnet_data.batch import collate_samples
from cnet_data.buckets import Bucket, BucketConfig, BucketTable
from cnet_data.dataset import AugmentConfig, ControlNetDataset
from cnet_data.index import DatasetIndex
from cnet_data.sampler import BucketBatchSampler
from cnet_data.scan import ScanConfig, scan
from cnet_data.sources import SourceConfig

TABLE = BucketTable([Bucket(48, 32), Bucket(32, 32), Bucket(32, 48)][::-1])


def _self_conditioned_index(tmp_path: Path, sizes: list[tuple[int, int]]) -> DatasetIndex:
    """Samples whose conditioning image is the image itself: any geometric difference shows."""
    rng = np.random.default_rng(0)
    lines = []
    for i, (w, h) in enumerate(sizes):
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(tmp_path / f"{i}.png")
        shutil.copy(tmp_path / f"{i}.png", tmp_path / f"{i}_c.png")
        lines.append(
            json.dumps({"image": f"{i}.png", "conditioning_image": f"{i}_c.png", "text": f"t{i}"})
        )
    (tmp_path / "m.jsonl").write_text("\n".join(lines))
    builder, _ = scan(SourceConfig(tmp_path / "m.jsonl"), ScanConfig(workers=1), progress=False)
    builder.write(tmp_path / "idx", root=tmp_path)
    return DatasetIndex(tmp_path / "idx")


def test_image_and_condition_get_the_same_crop_and_flip(tmp_path: Path) -> None:
    index = _self_conditioned_index(tmp_path, [(90, 50), (50, 90), (70, 70), (200, 100)])
    ids = TABLE.assign(index.widths, index.heights)
    for flip in (0.0, 1.0):
        dataset = ControlNetDataset(index, TABLE, ids, augment=AugmentConfig(flip_probability=flip))
        for i in range(len(dataset)):
            s = dataset[i]
            assert s["image"].dtype == torch.float32 and s["image"].shape[0] == 3
            assert s["image"].min() >= -1.0 and s["image"].max() <= 1.0
            assert s["conditioning_image"].min() >= 0.0 and s["conditioning_image"].max() <= 1.0
            torch.testing.assert_close((s["image"] + 1) / 2, s["conditioning_image"])
            bucket = TABLE[s["bucket"]]
            assert tuple(s["image"].shape[1:]) == (bucket.height, bucket.width)
            assert s["target_size"].tolist() == [bucket.height, bucket.width]
            assert s["original_size"].tolist() == list(index[i].size)


def test_sdxl_values_describe_the_crop(tmp_path: Path) -> None:
    index = _self_conditioned_index(tmp_path, [(200, 100)])
    dataset = ControlNetDataset(index, TABLE, TABLE.assign(index.widths, index.heights), seed=3)
    plan = dataset.plan(0)
    s = dataset[0]
    assert plan.resized_size == (32, 64)  # 200x100 covering 48x32 -> 64x32
    assert s["crop_top_left"].tolist() == list(plan.crop_top_left)
    # The crop equals a plain resize followed by the same crop.
    with index.store.open(index[0].image) as fh, Image.open(fh) as img:
        full = np.asarray(img.resize((64, 32), Image.Resampling.BICUBIC), dtype=np.float32)
    top, left = plan.crop_top_left
    expected = torch.from_numpy(full[top : top + 32, left : left + 48]).permute(2, 0, 1) / 255
    assert (s["conditioning_image"] - expected).abs().mean() < 0.02


def test_augmentation_is_a_function_of_seed_epoch_and_index(tmp_path: Path) -> None:
    index = _self_conditioned_index(tmp_path, [(300, 90)] * 6)
    ids = TABLE.assign(index.widths, index.heights)
    aug = AugmentConfig(flip_probability=0.5)
    a = ControlNetDataset(index, TABLE, ids, augment=aug, seed=1)
    b = ControlNetDataset(index, TABLE, ids, augment=aug, seed=1)
    crops = [a.plan(i) for i in range(6)]
    assert crops == [b.plan(i) for i in range(6)]
    a.set_epoch(1)
    assert crops != [a.plan(i) for i in range(6)]
    validation = ControlNetDataset(index, TABLE, ids, train=False, augment=aug)
    plan = validation.plan(0)
    assert not plan.flip and plan.crop_top_left == (0, (plan.resized_size[1] - 48) // 2)


def test_a_file_broken_after_indexing_is_replaced_not_fatal(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    index = _self_conditioned_index(tmp_path, [(60, 40)] * 3)
    (tmp_path / "1.png").write_bytes(b"broken since indexing")
    dataset = ControlNetDataset(index, TABLE, TABLE.assign(index.widths, index.heights))
    s = dataset[1]
    assert s["index"] == 2 and s["caption"] == "t2"
    assert dataset.replaced == 1
    assert "1.png" in caplog.text


def test_loader_with_sampler_and_workers(fill_index: DatasetIndex) -> None:
    table = BucketTable.from_config(BucketConfig(area=64 * 64, min_side=32, max_side=128, step=16))
    ids = table.assign(fill_index.widths, fill_index.heights)
    sampler = BucketBatchSampler(ids, 2, seed=0, bucket_log_aspects=table.log_aspects)
    dataset = ControlNetDataset(fill_index, table, sampler.bucket_ids)
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=2, collate_fn=collate_samples)
    seen = []
    for batch in loader:
        assert batch["image"].shape[0] == 2
        assert len(set(batch["bucket"].tolist())) == 1
        assert batch["image"].shape[2:] == batch["conditioning_image"].shape[2:]
        assert len(batch["caption"]) == 2
        seen.extend(batch["index"].tolist())
    assert sorted(seen) == list(range(len(fill_index)))


def test_mismatched_bucket_ids_are_refused(fill_index: DatasetIndex) -> None:
    with pytest.raises(ValueError, match="bucket_ids has 3 entries"):
        ControlNetDataset(fill_index, TABLE, np.zeros(3, dtype=np.int64))
