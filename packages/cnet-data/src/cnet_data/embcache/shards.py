"""Shard files: a fixed binary header, then N 16-byte keys, then N fixed-size records.

A shard is self-describing (magic, version, record count, record and key sizes), written under
a temporary name and renamed, so a shard that is visible is complete; one whose size disagrees
with its header was damaged afterwards and is reported, never read.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Sequence
from pathlib import Path

import attrs
import numpy as np
import numpy.typing as npt

from cnet_data.atomic import atomic_open
from cnet_data.captions import CAPTION_KEY_BYTES
from cnet_data.embcache.format import CacheCorruptError

SHARD_MAGIC = b"CNETEMBS"
SHARD_VERSION = 1
_HEADER = struct.Struct("<8sIIQQ")  # magic, version, key bytes, record count, record bytes
SHARD_HEADER_BYTES = 64  # room to grow; keeps keys and records 16-byte aligned
_NAME = re.compile(r"shard-r(\d{5,})-(\d{6,})\.bin")
_DELETE_HINT = "delete it and re-run `cnet-train embed` to recompute its entries"


def shard_name(rank: int, seq: int) -> str:
    return f"shard-r{rank:05d}-{seq:06d}.bin"


@attrs.frozen
class ShardInfo:
    """A committed shard, checked against its own header."""

    path: Path
    """Where the shard file is."""
    rank: int
    """The rank that wrote it (from the file name)."""
    seq: int
    """Its sequence number among that rank's shards (from the file name)."""
    count: int
    """Number of records (and keys) in it."""

    @property
    def name(self) -> str:
        return self.path.name


def shard_bytes(count: int, record_bytes: int) -> int:
    return SHARD_HEADER_BYTES + count * (CAPTION_KEY_BYTES + record_bytes)


def scan_shards(directory: Path, record_bytes: int) -> list[ShardInfo]:
    """Every committed shard in `directory`, by (rank, seq); temporary files are ignored."""
    found = []
    for path in directory.iterdir():
        if m := _NAME.fullmatch(path.name):
            count = _check_shard(path, record_bytes)
            found.append(ShardInfo(path=path, rank=int(m[1]), seq=int(m[2]), count=count))
    return sorted(found, key=lambda s: (s.rank, s.seq))


def _check_shard(path: Path, record_bytes: int) -> int:
    """The record count of a shard, after checking its header and size."""
    with path.open("rb") as fh:
        raw = fh.read(_HEADER.size)
    if len(raw) < _HEADER.size:
        raise CacheCorruptError(
            f"embedding cache shard {path} is truncated: {path.stat().st_size} bytes, shorter "
            f"than its {SHARD_HEADER_BYTES}-byte header; {_DELETE_HINT}"
        )
    magic, version, key_bytes, count, rec_bytes = _HEADER.unpack(raw)
    if magic != SHARD_MAGIC or version != SHARD_VERSION or key_bytes != CAPTION_KEY_BYTES:
        raise CacheCorruptError(
            f"{path} is not a version-{SHARD_VERSION} embedding cache shard (magic {magic!r}, "
            f"version {version}, key bytes {key_bytes}); {_DELETE_HINT}"
        )
    if rec_bytes != record_bytes:
        raise CacheCorruptError(
            f"embedding cache shard {path} has {rec_bytes}-byte records, but header.json's "
            f"fields make {record_bytes}-byte records; {_DELETE_HINT}"
        )
    expected, actual = shard_bytes(count, record_bytes), path.stat().st_size
    if actual != expected:
        state = "truncated" if actual < expected else "longer than its header says"
        raise CacheCorruptError(
            f"embedding cache shard {path} is {state}: {actual} bytes, expected {expected} for "
            f"{count} records of {record_bytes} bytes; {_DELETE_HINT}"
        )
    return int(count)


def records_offset(count: int) -> int:
    """Byte offset of the first record in a shard of `count` entries."""
    return SHARD_HEADER_BYTES + count * CAPTION_KEY_BYTES


def map_shard(
    info: ShardInfo, record_bytes: int
) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.uint8]]:
    """(keys (n, 16), records (n, record_bytes)) as read-only views of one memory map."""
    if info.count == 0:
        return np.zeros((0, CAPTION_KEY_BYTES), np.uint8), np.zeros((0, record_bytes), np.uint8)
    mm = np.memmap(info.path, dtype=np.uint8, mode="r")
    key_end = SHARD_HEADER_BYTES + info.count * CAPTION_KEY_BYTES
    keys = mm[SHARD_HEADER_BYTES:key_end].reshape(info.count, CAPTION_KEY_BYTES)
    return keys, mm[key_end:].reshape(info.count, record_bytes)


def write_shard(
    path: Path,
    keys: Sequence[npt.NDArray[np.uint8]],
    records: Sequence[npt.NDArray[np.uint8]],
    record_bytes: int,
) -> None:
    """Write one shard atomically from chunks of keys (k, 16) and records (k, record_bytes)."""
    count = sum(len(k) for k in keys)
    if count != sum(len(r) for r in records):
        raise ValueError("a shard needs as many records as keys")
    header = _HEADER.pack(SHARD_MAGIC, SHARD_VERSION, CAPTION_KEY_BYTES, count, record_bytes)
    with atomic_open(path) as fh:
        fh.write(header.ljust(SHARD_HEADER_BYTES, b"\0"))
        for chunk in [*keys, *records]:
            fh.write(np.ascontiguousarray(chunk, dtype=np.uint8).data)
