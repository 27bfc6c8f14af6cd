"""The `hf` source: a Hugging Face dataset in the fill50k layout, built here with `datasets`."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from cnet_data.buckets import Bucket, BucketTable
from cnet_data.cli import main
from cnet_data.dataset import ControlNetDataset
from cnet_data.index import DatasetIndex
from cnet_data.sampler import BucketBatchSampler
from cnet_data.scan import ScanConfig, scan
from cnet_data.sources import SourceConfig, SourceError
from cnet_data.synthetic import write_fill_dataset

datasets = pytest.importorskip("datasets")

TABLE = BucketTable([Bucket(64, 64), Bucket(96, 64), Bucket(64, 96)])
COUNT = 12


def _rows(root: Path, *, embedded: bool = True) -> dict[str, list[object]]:
    """The loose fill dataset under `root` as the fill50k columns: the images' bytes embedded,
    as on the hub (or, not `embedded`, only their absolute paths, as `to_parquet` keeps a
    dataset built from local files)."""
    lines = [json.loads(x) for x in (root / "manifest.jsonl").read_text().splitlines()]

    def image(rel: str) -> object:
        path = root / rel
        return {"bytes": path.read_bytes(), "path": path.name} if embedded else str(path)

    return {
        "image": [image(x["image"]) for x in lines],
        "conditioning_image": [image(x["conditioning_image"]) for x in lines],
        "text": [x["text"] for x in lines],
    }


def _dataset(columns: dict[str, list[object]]) -> Any:
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "conditioning_image": datasets.Image(),
            "text": datasets.Value("string"),
        }
    )
    return datasets.Dataset.from_dict(columns, features=features)


def _index(source: SourceConfig, out: Path) -> DatasetIndex:
    builder, report = scan(source, ScanConfig(workers=1), progress=False)
    assert report.bad == []
    builder.write(out)
    return DatasetIndex(out)


@pytest.fixture
def loose(tmp_path: Path) -> DatasetIndex:
    write_fill_dataset(tmp_path / "loose", COUNT)
    return _index(SourceConfig(tmp_path / "loose" / "manifest.jsonl"), tmp_path / "i-loose")


def _same_samples(a: DatasetIndex, b: DatasetIndex) -> None:
    assert len(a) == len(b) == COUNT
    assert np.array_equal(a.sizes, b.sizes)
    assert [a.caption(i) for i in range(COUNT)] == [b.caption(i) for i in range(COUNT)]
    ids = TABLE.assign(a.widths, a.heights)
    x_set = ControlNetDataset(a, TABLE, ids, seed=3)
    y_set = ControlNetDataset(b, TABLE, ids, seed=3)
    for i in range(COUNT):
        x, y = x_set[i], y_set[i]
        assert torch.equal(x["image"], y["image"])
        assert torch.equal(x["conditioning_image"], y["conditioning_image"])
    batches = [list(BucketBatchSampler(ids, 2, num_replicas=1, rank=0, seed=5)) for _ in "ab"]
    assert batches[0] == batches[1]


def test_parquet_in_the_fill50k_layout_reads_like_the_loose_files(
    tmp_path: Path, loose: DatasetIndex
) -> None:
    (tmp_path / "hub" / "data").mkdir(parents=True)
    parquet = tmp_path / "hub" / "data" / "train-00000-of-00001.parquet"
    _dataset(_rows(tmp_path / "loose")).to_parquet(str(parquet))
    _dataset(_rows(tmp_path / "loose")).select(range(2)).to_parquet(
        str(tmp_path / "hub" / "data" / "test-00000-of-00001.parquet")
    )
    config = SourceConfig(tmp_path / "hub")
    assert config.resolved_format == "hf" and config.root == tmp_path / "hub"
    rows = _index(config, tmp_path / "i-hf")
    assert rows.store.kind == "hf"
    _same_samples(loose, rows)
    assert _index(SourceConfig(parquet), tmp_path / "i-file").store.root == parquet.parent


def test_a_saved_dataset_is_memory_mapped_and_reads_like_the_loose_files(
    tmp_path: Path, loose: DatasetIndex
) -> None:
    _dataset(_rows(tmp_path / "loose")).save_to_disk(str(tmp_path / "saved"))
    config = SourceConfig(tmp_path / "saved")
    assert config.resolved_format == "hf"
    _same_samples(loose, _index(config, tmp_path / "i-saved"))
    # A dataset built from local files keeps their paths, unless it is pushed to the hub.
    by_path = _dataset(_rows(tmp_path / "loose", embedded=False))
    by_path.to_parquet(str(tmp_path / "paths.parquet"))
    _same_samples(loose, _index(SourceConfig(tmp_path / "paths.parquet"), tmp_path / "i-p"))


def _png(size: tuple[int, int]) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, (9, 9, 9)).save(out, format="PNG")
    return out.getvalue()


def test_bad_rows_are_reported_with_exact_counts(tmp_path: Path, loose: DatasetIndex) -> None:
    columns = _rows(tmp_path / "loose")
    image = columns["image"]
    image[1] = {"bytes": b"not an image", "path": None}
    image[2] = {"bytes": _png((40, 64)), "path": None}  # its conditioning image is 64x64
    image[3] = None
    columns["text"][4] = None
    _dataset(columns).to_parquet(str(tmp_path / "bad.parquet"))
    _, report = scan(
        SourceConfig(tmp_path / "bad.parquet"), ScanConfig(workers=1, on_bad="skip"), progress=False
    )
    assert report.total == COUNT and report.accepted == COUNT - 4
    kinds = report.counts_by_kind()
    assert kinds == {"caption_not_text": 1, "size_mismatch": 1, "unreadable": 2}
    reasons = {b.where: b.reason for b in report.bad}
    assert sorted(reasons) == [f"bad.parquet:{i}" for i in (1, 2, 3, 4)]
    assert "not a readable image" in reasons["bad.parquet:1"]
    assert "row 3 of bad.parquet has no image bytes" in reasons["bad.parquet:3"]


def test_columns_are_named_and_a_missing_one_says_what_there_is(tmp_path: Path) -> None:
    write_fill_dataset(tmp_path / "loose", 4)
    columns = _rows(tmp_path / "loose")
    renamed = {"target": columns["image"], "source": columns["conditioning_image"]}
    features = datasets.Features(
        {"target": datasets.Image(), "source": datasets.Image(), "prompt": datasets.Value("string")}
    )
    table = datasets.Dataset.from_dict({**renamed, "prompt": columns["text"]}, features=features)
    table.to_parquet(str(tmp_path / "p.parquet"))
    with pytest.raises(SourceError, match=r"no column 'image'.*it has target, source, prompt"):
        scan(SourceConfig(tmp_path / "p.parquet"), ScanConfig(workers=1), progress=False)
    named = SourceConfig(
        tmp_path / "p.parquet", image_key="target", conditioning_key="source", caption_key="prompt"
    )
    _, report = scan(named, ScanConfig(workers=1), progress=False)
    assert report.accepted == 4


def test_cnet_data_index_reads_a_dataset_and_the_index_moves_with_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_fill_dataset(tmp_path / "loose", 6)
    _dataset(_rows(tmp_path / "loose")).save_to_disk(str(tmp_path / "saved"))
    out = tmp_path / "index"
    assert main(["index", str(tmp_path / "saved"), "--out", str(out), "--workers", "2"]) == 0
    assert "6 accepted" in capsys.readouterr().out
    (tmp_path / "saved").rename(tmp_path / "moved")
    moved = DatasetIndex(out, root=tmp_path / "moved")
    with moved.store.open(moved[5].image) as fh:
        assert Image.open(fh).size == (int(moved.widths[5]), int(moved.heights[5]))


def test_a_hub_id_is_downloaded_to_path_then_read(
    tmp_path: Path, loose: DatasetIndex, monkeypatch: pytest.MonkeyPatch
) -> None:
    hub = pytest.importorskip("huggingface_hub")
    published = tmp_path / "published"
    (published / "data").mkdir(parents=True)
    _dataset(_rows(tmp_path / "loose")).to_parquet(
        str(published / "data" / "train-00000-of-00001.parquet")
    )
    asked: list[tuple[str, str]] = []

    def download(repo_id: str, *, repo_type: str, local_dir: Path, **_: object) -> str:
        asked.append((repo_id, repo_type))
        shutil.copytree(published, local_dir, dirs_exist_ok=True)
        return str(local_dir)

    monkeypatch.setattr(hub, "snapshot_download", download)
    config = SourceConfig(tmp_path / "kept", url="hf://datasets/someone/fill50k")
    assert config.resolved_format == "hf"
    _same_samples(loose, _index(config, tmp_path / "i-hub"))
    assert asked == [("someone/fill50k", "dataset")]
    bad = SourceConfig(tmp_path / "kept", url="s3://bucket/rows", format="hf")
    with pytest.raises(SourceError, match="is not a hub dataset"):
        scan(bad, ScanConfig(workers=1), progress=False)


def test_splits_are_picked_and_a_missing_one_names_those_there_are(tmp_path: Path) -> None:
    write_fill_dataset(tmp_path / "loose", 6)
    whole = _dataset(_rows(tmp_path / "loose"))
    splits = datasets.DatasetDict(
        {"train": whole.select(range(4)), "validation": whole.select(range(4, 6))}
    )
    splits.save_to_disk(str(tmp_path / "saved"))
    # datasets writes its own caches next to the data when a loaded dataset is mapped
    cache = tmp_path / "saved" / "train" / "cache-0123abcd.arrow"
    cache.write_bytes((tmp_path / "saved" / "train" / "data-00000-of-00001.arrow").read_bytes())
    counts = {}
    for split in ("train", "validation"):
        config = SourceConfig(tmp_path / "saved", split=split)
        _, report = scan(config, ScanConfig(workers=1), progress=False)
        counts[split] = report.accepted
    assert counts == {"train": 4, "validation": 2}
    with pytest.raises(SourceError, match="has no split 'test'") as missing:
        scan(SourceConfig(tmp_path / "saved", split="test"), ScanConfig(workers=1), progress=False)
    assert "train, validation" in missing.value.hint


def test_a_file_pyarrow_cannot_read_is_named(tmp_path: Path) -> None:
    pointer = tmp_path / "train-00000-of-00001.parquet"
    pointer.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 9\n")
    with pytest.raises(SourceError, match=f"dataset file {pointer} cannot be read") as bad:
        scan(SourceConfig(pointer), ScanConfig(workers=1), progress=False)
    assert "git lfs pull" in bad.value.hint
