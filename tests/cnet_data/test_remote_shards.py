"""Tar shards at an fsspec URL (an in-memory filesystem): ranged reads and the read cache."""

from __future__ import annotations

import uuid
from pathlib import Path

import numpy as np
import pytest
import torch

from cnet_data.buckets import Bucket, BucketTable
from cnet_data.dataset import ControlNetDataset
from cnet_data.index import DatasetIndex
from cnet_data.remote_reads import ReadThroughCache
from cnet_data.sampler import BucketBatchSampler
from cnet_data.scan import ScanConfig, scan
from cnet_data.sources import SourceConfig, SourceError
from cnet_data.synthetic import write_fill_shards
from cnet_data.tar_shards import TarShards

fsspec = pytest.importorskip("fsspec")

TABLE = BucketTable([Bucket(64, 64), Bucket(96, 64), Bucket(64, 96)])
COUNT = 12


def _index(source: SourceConfig, out: Path) -> DatasetIndex:
    # One process: the memory filesystem lives in this one.
    builder, report = scan(source, ScanConfig(workers=1), progress=False)
    assert report.bad == []
    builder.write(out)
    return DatasetIndex(out)


@pytest.fixture
def bucket() -> str:
    """A fresh folder of the in-memory filesystem, holding three shards of four samples."""
    return f"memory://cnet-{uuid.uuid4().hex}"


def _upload(shards: list[Path], url: str) -> None:
    fs = fsspec.filesystem("memory")
    for shard in shards:
        fs.pipe(url.removeprefix("memory://") + "/" + shard.name, shard.read_bytes())


def test_shards_at_a_url_read_like_the_same_local_shards(tmp_path: Path, bucket: str) -> None:
    shards = write_fill_shards(tmp_path / "local", COUNT, samples_per_shard=4)
    _upload(shards, bucket)
    local = _index(SourceConfig(tmp_path / "local"), tmp_path / "i-local")
    remote_config = SourceConfig(tmp_path / "kept", url=bucket)
    assert remote_config.resolved_format == "tar"
    remote = _index(remote_config, tmp_path / "i-remote")
    assert isinstance(remote.store, TarShards) and remote.store.url == bucket
    assert np.array_equal(local.sizes, remote.sizes)
    assert [local.caption(i) for i in range(COUNT)] == [remote.caption(i) for i in range(COUNT)]
    ids = TABLE.assign(local.widths, local.heights)
    a, b = (
        ControlNetDataset(local, TABLE, ids, seed=2),
        ControlNetDataset(remote, TABLE, ids, seed=2),
    )
    sampler = BucketBatchSampler(ids, 2, num_replicas=1, rank=0, seed=3)
    for batch in sampler:
        for i in batch:
            assert torch.equal(a[i]["image"], b[i]["image"])
            assert torch.equal(a[i]["conditioning_image"], b[i]["conditioning_image"])


def test_a_member_is_one_ranged_read_then_comes_from_the_cache(
    tmp_path: Path, bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    _upload(write_fill_shards(tmp_path / "local", COUNT, samples_per_shard=4), bucket)
    config = SourceConfig(tmp_path / "kept", url=bucket, read_cache_gib=1.0)
    index = _index(config, tmp_path / "i")
    store = index.store
    assert isinstance(store, TarShards) and store.cache_bytes == 2**30
    reads: list[tuple[int, int]] = []
    memory = type(fsspec.filesystem("memory"))
    original = memory.cat_file

    def counted(self: object, path: str, start: int, end: int) -> bytes:
        reads.append((start, end))
        return bytes(original(self, path, start=start, end=end))

    monkeypatch.setattr(memory, "cat_file", counted)
    # The scan read every member once through the cache; reading them again asks nothing.
    for i in range(COUNT):
        with store.open(index[i].image) as fh:
            assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    assert reads == []
    fsspec.filesystem("memory").rm(bucket.removeprefix("memory://"), recursive=True)
    with store.open(index[3].conditioning) as fh:  # gone remotely, still cached
        assert fh.read(4) == b"\x89PNG"
    uncached = TarShards(store.root, store.url, 0)
    with pytest.raises(FileNotFoundError):
        uncached.open(index[3].conditioning)


def test_the_read_cache_stays_within_its_bound(tmp_path: Path) -> None:
    cache = ReadThroughCache(tmp_path / "c", max_bytes=16_000)
    for i in range(200):
        member = bytes([i % 256]) * 1000
        assert cache.read(f"k{i}", lambda member=member: member, 1000) == member  # type: ignore[misc]
    # Trimmed every max/16 bytes written: at most that much (one member) over the bound.
    assert cache.trim() <= 16_000
    held = sum(p.stat().st_size for p in (tmp_path / "c").rglob("*") if p.is_file())
    assert 14_000 <= held <= 16_000
    refetched = b"r" * 1000
    assert cache.read("k199", lambda: refetched, 1000) == bytes([199]) * 1000  # newest kept
    assert cache.read("k0", lambda: refetched, 1000) == refetched  # oldest removed
    cut = next(p for p in (tmp_path / "c").rglob("*") if p.is_file())
    cut.write_bytes(cut.read_bytes()[:10])  # as a power loss may leave an unsynced member
    assert refetched in [cache.read(f"k{i}", lambda: refetched, 1000) for i in range(200)]


def test_a_url_without_shards_names_it(tmp_path: Path, bucket: str) -> None:
    fsspec.filesystem("memory").pipe(bucket.removeprefix("memory://") + "/notes.txt", b"x")
    with pytest.raises(SourceError, match=r"holds no \.tar shard"):
        scan(SourceConfig(tmp_path / "kept", url=bucket), ScanConfig(workers=1), progress=False)


def test_one_shard_as_the_url_and_what_is_not_a_shard(tmp_path: Path, bucket: str) -> None:
    (shard,) = write_fill_shards(tmp_path / "local", 3)
    _upload([shard], bucket)
    one = f"{bucket}/{shard.name}"
    index = _index(SourceConfig(tmp_path / "kept", url=one), tmp_path / "i")
    assert len(index) == 3
    assert index.store.describe(index[0].image) == f"{one} member 000000.png"
    fsspec.filesystem("memory").pipe(bucket.removeprefix("memory://") + "/notes.txt", b"x")
    with pytest.raises(SourceError, match=r"holds no \.tar shard"):
        scan(SourceConfig(tmp_path / "k2", url=f"{bucket}/notes.txt"), ScanConfig(workers=1))
