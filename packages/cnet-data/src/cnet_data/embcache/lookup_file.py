"""`lookup.bin`: the finalized lookup table on disk, and `finalize`, which writes it.

Layout: 8-byte magic, a little-endian uint64 length, that many bytes of JSON metadata (table
size, entry count, the shards covered by name and record count, array offsets), then the arrays
`starts`, `keys` and `location`, each at a 64-byte-aligned offset, so that readers memory-map
them as they are. The file is valid only for exactly the shards it lists; anything else (a
shard added since, a shard deleted) and readers build the table in memory instead.
"""

from __future__ import annotations

import json
import logging
import struct
from pathlib import Path
from typing import Any

import numpy as np

from cnet_data.atomic import atomic_open
from cnet_data.embcache.format import RecordLayout
from cnet_data.embcache.header import read_header
from cnet_data.embcache.lookup import KEY_DTYPE, LookupTable, build_lookup
from cnet_data.embcache.shards import ShardInfo, map_shard, scan_shards

LOOKUP_NAME = "lookup.bin"
_MAGIC = b"CNETLKP1"
_PREFIX = struct.Struct("<8sQ")
_ALIGN = 64

logger = logging.getLogger(__name__)

Coverage = list[list[Any]]  # [[shard name, record count], ...] as stored in the JSON


def coverage(shards: list[ShardInfo]) -> Coverage:
    return [[s.name, s.count] for s in shards]


def finalize(directory: Path) -> int:
    """Write `lookup.bin` for every committed shard; returns the number of distinct keys.

    Call once after all writers have finished (e.g. on rank 0 after a barrier). Readers then
    memory-map the table instead of building it from every shard's keys when they open.
    """
    directory = Path(directory)
    layout = RecordLayout.of(read_header(directory).fields)
    shards = scan_shards(directory, layout.record_bytes)
    table = build_from_shards(shards, layout.record_bytes)
    save_lookup(directory / LOOKUP_NAME, table, coverage(shards))
    return len(table)


def build_from_shards(shards: list[ShardInfo], record_bytes: int) -> LookupTable:
    # map_shard views the key region only; the records are never touched.
    return build_lookup([map_shard(s, record_bytes)[0] for s in shards])


def _aligned(pos: int) -> int:
    return -(-pos // _ALIGN) * _ALIGN


def save_lookup(path: Path, table: LookupTable, shards: Coverage) -> None:
    arrays: dict[str, np.ndarray[Any, Any]] = {
        "starts": table.starts,
        "keys": table.keys,
        "location": table.location,
    }
    offsets, pos = {}, 0
    for name, array in arrays.items():
        offsets[name], pos = pos, _aligned(pos + array.nbytes)
    meta = {
        "table_size": len(table.starts) - 1,
        "entries": len(table),
        "shards": shards,
        "offsets": offsets,
    }
    blob = json.dumps(meta).encode("utf-8")
    data_start = _aligned(_PREFIX.size + len(blob))
    with atomic_open(path) as fh:
        fh.write(_PREFIX.pack(_MAGIC, len(blob)) + blob)
        for name, array in arrays.items():
            fh.seek(data_start + offsets[name])
            fh.write(np.ascontiguousarray(array).data)
        fh.truncate(data_start + pos)  # an empty last array still owns its (zero) bytes


def load_lookup(path: Path) -> tuple[LookupTable, Coverage] | None:
    """The memory-mapped table and the shards it covers; None (and a warning) when unusable."""
    try:
        with path.open("rb") as fh:
            magic, size = _PREFIX.unpack(fh.read(_PREFIX.size))
            if magic != _MAGIC:
                raise ValueError(f"bad magic {magic!r}")
            meta = json.loads(fh.read(size))
        m, n, offsets = int(meta["table_size"]), int(meta["entries"]), meta["offsets"]
        base = _aligned(_PREFIX.size + size)
        mm = np.memmap(path, dtype=np.uint8, mode="r")
        if len(mm) < base + offsets["location"] + n * 8:
            raise ValueError(f"{len(mm)} bytes is too short for {n} entries")

        def part(name: str, nbytes: int) -> np.ndarray[Any, Any]:
            return mm[base + offsets[name] : base + offsets[name] + nbytes]

        table = LookupTable(
            starts=part("starts", (m + 1) * 8).view(np.int64),
            keys=part("keys", n * 16).view(KEY_DTYPE).reshape(n, 2),
            location=part("location", n * 8).view(np.uint32).reshape(n, 2),
        )
        return table, meta["shards"]
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError, struct.error) as exc:
        logger.warning("ignoring damaged %s (%s); run finalize to rewrite it", path, exc)
        return None
