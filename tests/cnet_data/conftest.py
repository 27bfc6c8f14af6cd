"""Fixtures for the cnet-data tests: small generated datasets, nothing downloaded.

Test folders have no __init__.py, so that `cnet_data` always names the package under test;
shared helpers are fixtures here."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cnet_data.index import DatasetIndex
from cnet_data.scan import ScanConfig, scan
from cnet_data.sources import SourceConfig
from cnet_data.synthetic import write_fill_dataset


@pytest.fixture
def fill_manifest(tmp_path: Path) -> Path:
    """A 12-sample fill dataset (three sizes) and its JSONL manifest."""
    return write_fill_dataset(tmp_path / "fill", 12, sidecars=True)


@pytest.fixture
def fill_index(tmp_path: Path, fill_manifest: Path) -> DatasetIndex:
    builder, _ = scan(SourceConfig(fill_manifest), ScanConfig(workers=1), progress=False)
    builder.write(tmp_path / "index", root=fill_manifest.parent)
    return DatasetIndex(tmp_path / "index")


# -- a corpus with every bad-sample kind ----------------------------------------------------


def _image(path: Path, w: int, h: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path, quality=90)


def _declared_bomb(path: Path) -> None:
    """A 4x4 PNG whose header claims 2000x2000 (4 MP)."""
    Image.new("RGB", (4, 4)).save(path)
    data = bytearray(path.read_bytes())
    data[16:24] = struct.pack(">II", 2000, 2000)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF)
    path.write_bytes(bytes(data))


def write_bad_corpus(root: Path) -> Path:
    """Files and a JSONL manifest under `root`; returns the manifest path."""
    root.mkdir(parents=True, exist_ok=True)
    for i in range(3):
        _image(root / f"good{i}.png", 48, 32, i)
        _image(root / f"good{i}_c.png", 48, 32, 10 + i)
    (root / "junk.png").write_bytes(b"\x89PNG but not really" * 20)
    _image(root / "full.jpg", 64, 64, 20)
    data = (root / "full.jpg").read_bytes()
    (root / "cut.jpg").write_bytes(data[: len(data) // 2])
    (root / "zero.png").write_bytes(b"")
    _image(root / "other_size.png", 40, 32, 21)
    _declared_bomb(root / "bomb.png")

    def entry(image: str, cond: str, text: object) -> str:
        return json.dumps({"image": image, "conditioning_image": cond, "text": text})

    lines = [
        entry("good0.png", "good0_c.png", "a red circle"),
        entry("good1.png", "good1_c.png", ""),  # empty caption: accepted, counted
        entry("good2.png", "good2_c.png", "  a blue square \n"),
        entry("junk.png", "good0_c.png", "corrupt"),
        entry("cut.jpg", "full.jpg", "truncated"),
        entry("good0.png", "zero.png", "zero bytes"),
        entry("good0.png", "nowhere.png", "missing conditioning"),
        entry("good0.png", "other_size.png", "size mismatch"),
        entry("bomb.png", "bomb.png", "bomb"),
        entry("good0.png", "good0_c.png", 42),
        entry("good0.png", "good0_c.png", ["a", "list"]),
        entry("../outside.png", "good0_c.png", "escape"),
        entry("/etc/passwd", "good0_c.png", "absolute"),
        "{not json",
        json.dumps({"image": "good0.png", "text": "no conditioning key"}),
        "",  # blank lines are skipped, not reported
    ]
    manifest = root / "manifest.jsonl"
    manifest.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return manifest


@pytest.fixture
def bad_corpus(tmp_path: Path) -> Path:
    """The manifest of a corpus holding every bad kind (test_scan.py says what it holds)."""
    return write_bad_corpus(tmp_path / "corpus")
