"""The source protocol: kinds by name, a store that is not a folder, and older indexes."""

from __future__ import annotations

import io
import json
import typing
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import BinaryIO, cast

import attrs
import numpy as np
import pytest
import torch
from PIL import Image

from cnet_data.buckets import Bucket, BucketTable
from cnet_data.dataset import ControlNetDataset
from cnet_data.index import DatasetIndex, IndexBuilder, IndexFormatError, is_older_index
from cnet_data.jsonlines import LineCount
from cnet_data.local_files import LocalFiles
from cnet_data.scan import ScanConfig, scan
from cnet_data.source_protocol import SourceRecord
from cnet_data.source_registry import (
    SOURCE_KINDS,
    STORE_KINDS,
    UnknownKindError,
    register_source,
    source_for,
    store_from_header,
)
from cnet_data.sources import SourceConfig, SourceFormat

BLOBS: dict[str, bytes] = {}
"""The members of the in-memory store below, by reference."""


@attrs.frozen
class MemoryStore:
    """A store whose members are bytes in `BLOBS`: no file, no root to join."""

    root: Path = Path("/nowhere")

    @property
    def kind(self) -> str:
        return "memory"

    def open(self, reference: str) -> BinaryIO:
        if reference not in BLOBS:
            raise FileNotFoundError(reference)
        return io.BytesIO(BLOBS[reference])

    def describe(self, reference: str) -> str:
        return f"memory:{reference}"

    def relocated(self, root: Path) -> MemoryStore:
        return MemoryStore(root)

    def header(self) -> Mapping[str, object]:
        return {"kind": "memory"}


@attrs.frozen
class MemorySource:
    """Three records: two good pairs and one whose conditioning member is missing."""

    config: SourceConfig

    @property
    def store(self) -> MemoryStore:
        return MemoryStore()

    @property
    def counts_lines(self) -> bool:
        return False

    def records(self, count: LineCount) -> Iterator[SourceRecord]:
        for key in ("a", "b", "gone"):
            yield SourceRecord(f"row {key}", f"{key}/image", f"{key}/cond", caption=f"cap {key}")


def _png(pixels: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def test_every_format_name_is_a_registered_kind() -> None:
    assert set(typing.get_args(SourceFormat)) == set(SOURCE_KINDS)
    assert set(STORE_KINDS) == {"files", "tar", "hf"}
    with pytest.raises(ValueError, match="already registered"):
        register_source("jsonl", MemorySource)


def test_a_store_that_is_not_a_folder_scans_and_loads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = np.random.default_rng(0)
    images = {key: rng.integers(0, 256, (24, 32, 3), dtype=np.uint8) for key in ("a", "b")}
    for key, pixels in images.items():
        BLOBS[f"{key}/image"] = _png(pixels)
        BLOBS[f"{key}/cond"] = _png(255 - pixels)
    BLOBS["gone/image"] = _png(images["a"])
    monkeypatch.setitem(SOURCE_KINDS, "memory", MemorySource)
    monkeypatch.setitem(STORE_KINDS, "memory", lambda header: MemoryStore())
    config = SourceConfig(Path("memory"), format=cast(SourceFormat, "memory"))
    assert isinstance(source_for(config), MemorySource)

    builder, report = scan(config, ScanConfig(on_bad="skip", workers=1), progress=False)
    assert (report.accepted, report.lines_read) == (2, None)
    assert [(b.where, b.kind, b.conditioning) for b in report.bad] == [
        ("row gone", "missing_file", "gone/cond")
    ]
    builder.write(tmp_path / "index")
    index = DatasetIndex(tmp_path / "index")
    assert json.loads((tmp_path / "index" / "index.json").read_text())["store"] == {
        "kind": "memory"
    }
    assert isinstance(index.store, MemoryStore)
    assert index.store.describe(index[1].image) == "memory:b/image"
    table = BucketTable([Bucket(width=32, height=24)])
    dataset = ControlNetDataset(index, table, np.zeros(2, np.int64), train=False)
    sample = dataset[1]
    expected = torch.from_numpy(images["b"]).permute(2, 0, 1).float()
    torch.testing.assert_close(sample["image"], expected * (2 / 255) - 1)
    torch.testing.assert_close(sample["conditioning_image"], (255 - expected) / 255)


def test_a_store_nothing_reads_is_named() -> None:
    with pytest.raises(UnknownKindError, match=r"kind 'shards'.*reads files"):
        store_from_header({"kind": "shards"})
    moved = store_from_header({"kind": "files", "root": "/a"}, root=Path("/b"))
    assert moved == LocalFiles(Path("/b"))
    with pytest.raises(ValueError, match="needs a root folder"):
        store_from_header({"kind": "files"})


def _as_version_1(index: Path) -> None:
    """Rewrite a current index's header the way cnet-data wrote version 1: a root, no store."""
    header = json.loads((index / "index.json").read_text())
    header["root"] = header.pop("store")["root"]
    header["version"] = 1
    (index / "index.json").write_text(json.dumps(header))


def test_an_index_of_the_older_version_is_refused_with_what_to_do(tmp_path: Path) -> None:
    builder = IndexBuilder()
    builder.add("a.png", "b.png", "c", 8, 8)
    builder.write(tmp_path / "idx", root=tmp_path)
    assert not is_older_index(tmp_path / "idx")
    _as_version_1(tmp_path / "idx")
    assert is_older_index(tmp_path / "idx") and not is_older_index(tmp_path / "nothing")
    with pytest.raises(IndexFormatError, match=r"has version 1.*re-index") as info:
        DatasetIndex(tmp_path / "idx")
    assert "cnet-data index" in info.value.hint
    builder.write(tmp_path / "idx", root=tmp_path)  # an older index is ours to replace
    assert DatasetIndex(tmp_path / "idx").store == LocalFiles(tmp_path)


def test_an_index_without_a_store_is_damaged(tmp_path: Path) -> None:
    IndexBuilder().write(tmp_path / "idx", root=tmp_path)
    header = json.loads((tmp_path / "idx" / "index.json").read_text())
    del header["store"]
    (tmp_path / "idx" / "index.json").write_text(json.dumps(header))
    with pytest.raises(IndexFormatError, match="names no sample store"):
        DatasetIndex(tmp_path / "idx")
    with pytest.raises(ValueError, match="needs root="):
        IndexBuilder().write(tmp_path / "other")
