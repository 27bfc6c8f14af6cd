"""The on-disk index: round trip, damage detection, atomic replacement, cheap pickling."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest

from cnet_data.captions import caption_key_hex
from cnet_data.index import INDEX_VERSION, DatasetIndex, IndexBuilder, IndexFormatError


def _builder(n: int) -> IndexBuilder:
    builder = IndexBuilder()
    for i in range(n):
        builder.add(f"img/{i}.png", f"cond/ü{i}.png", f"caption {i % 3} ✓", 10 + i, 20 + i)
    return builder


def test_round_trip(tmp_path: Path) -> None:
    _builder(50).write(tmp_path / "idx", root=tmp_path / "data", extra={"note": "x"})
    index = DatasetIndex(tmp_path / "idx")
    assert len(index) == 50
    sample = index[7]
    assert (sample.image, sample.conditioning) == ("img/7.png", "cond/ü7.png")
    assert index.store.describe(sample.image) == str(tmp_path / "data" / "img/7.png")
    assert index.store.describe(sample.conditioning) == str(tmp_path / "data" / "cond/ü7.png")
    assert sample.caption == "caption 1 ✓"
    assert sample.caption_key == caption_key_hex("caption 1 ✓")
    assert sample.size == (17, 27)
    assert index[-1].size == (59, 69)
    assert index.header["note"] == "x"
    with pytest.raises(IndexError):
        index[50]
    moved = DatasetIndex(tmp_path / "idx", root=Path("/elsewhere"))
    assert moved.store.describe(moved[0].image) == "/elsewhere/img/0.png"


def test_empty_index(tmp_path: Path) -> None:
    IndexBuilder().write(tmp_path / "idx", root=tmp_path)
    assert len(DatasetIndex(tmp_path / "idx")) == 0


def test_damage_is_reported(tmp_path: Path) -> None:
    _builder(5).write(tmp_path / "idx", root=tmp_path)
    blob = tmp_path / "idx" / "captions.bin"
    blob.write_bytes(blob.read_bytes()[:-3])
    with pytest.raises(IndexFormatError, match=r"captions\.bin has .* bytes"):
        DatasetIndex(tmp_path / "idx")
    with pytest.raises(IndexFormatError, match="run `cnet-data index`"):
        DatasetIndex(tmp_path / "nothing")


def test_a_failed_rewrite_keeps_the_old_index(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _builder(3).write(tmp_path / "idx", root=tmp_path)

    def fail(self: IndexBuilder, out: Path) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(IndexBuilder, "_write_columns", fail)
    with pytest.raises(OSError, match="disk full"):
        _builder(9).write(tmp_path / "idx", root=tmp_path)
    assert len(DatasetIndex(tmp_path / "idx")) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx"]  # no staging left behind
    monkeypatch.undo()
    _builder(9).write(tmp_path / "idx", root=tmp_path)
    assert len(DatasetIndex(tmp_path / "idx")) == 9


def test_pickles_by_location_not_by_content(tmp_path: Path) -> None:
    _builder(2000).write(tmp_path / "idx", root=tmp_path)
    index = DatasetIndex(tmp_path / "idx")
    data = pickle.dumps(index)
    assert len(data) < 1000
    clone = pickle.loads(data)
    assert clone[1234] == index[1234]
    assert isinstance(clone.sizes, np.memmap)


def test_version_mismatch_is_refused(tmp_path: Path) -> None:
    _builder(1).write(tmp_path / "idx", root=tmp_path)
    header = tmp_path / "idx" / "index.json"
    header.write_text(header.read_text().replace(f'"version": {INDEX_VERSION}', '"version": 99'))
    with pytest.raises(IndexFormatError, match="version 99"):
        DatasetIndex(tmp_path / "idx")
