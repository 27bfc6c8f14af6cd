"""Writing a cache: batched, sharded by rank, resumable, atomic per shard."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from cnet_data.embcache.format import FieldSpec, RecordLayout, as_key, keys_array
from cnet_data.embcache.header import CacheHeader, ensure_header, normalise_fingerprint
from cnet_data.embcache.keyset import KeySet
from cnet_data.embcache.lookup_file import build_from_shards
from cnet_data.embcache.shards import scan_shards, shard_name, write_shard

Chunks = list[npt.NDArray[np.uint8]]


class EmbeddingCacheWriter:
    """Adds embeddings to a cache directory, skipping every key the cache already holds.

    Records are buffered and written `shard_records` at a time as one shard, under a temporary
    name renamed into place, so an interrupted run leaves only whole shards and a rerun (which
    skips the keys of every committed shard, of every rank) does only the missing work. The
    buffer holds up to `shard_records` records in RAM (about 1.3 GB at SDXL size for 4096).
    Ranks write disjoint shard names, so all ranks may write to one directory at once; the
    same caption embedded by two ranks at once is stored twice and read once.

    Used as a context manager, a clean exit writes the last, partial shard. When an exception
    escapes, what is still buffered is dropped (a rerun recomputes it) rather than trusted.
    """

    def __init__(
        self,
        directory: Path | str,
        *,
        fingerprint: Mapping[str, Any],
        fields: Sequence[FieldSpec],
        rank: int = 0,
        shard_records: int = 4096,
    ) -> None:
        if rank < 0 or shard_records < 1:
            raise ValueError(f"need rank >= 0 and shard_records >= 1, got {rank}, {shard_records}")
        self.directory = Path(directory)
        self.rank = rank
        self.shard_records = shard_records
        self.layout = RecordLayout.of(fields)
        header = CacheHeader(fingerprint=normalise_fingerprint(fingerprint), fields=tuple(fields))
        ensure_header(self.directory, header)
        shards = scan_shards(self.directory, self.layout.record_bytes)
        self._known = KeySet(build_from_shards(shards, self.layout.record_bytes))
        self._seq = 1 + max((s.seq for s in shards if s.rank == rank), default=-1)
        self._keys: Chunks = []
        self._records: Chunks = []
        self._closed = False

    @property
    def pending(self) -> int:
        """Records buffered, not yet in a shard."""
        return sum(len(k) for k in self._keys)

    def missing(self, keys: Sequence[bytes | str]) -> list[bytes]:
        """The distinct keys, in first-seen order, that are neither stored nor buffered."""
        unique = list(dict.fromkeys(as_key(k) for k in keys))
        known = self._known.known(unique)
        return [k for k, seen in zip(unique, known, strict=True) if not seen]

    def add(self, keys: Sequence[bytes | str], tensors: Mapping[str, torch.Tensor]) -> int:
        """Buffer the entries whose keys are new; returns how many were new.

        `tensors` maps every field name to a tensor of shape (len(keys), *field.shape); values
        are cast to the field's storage dtype. Duplicate keys (within the batch, or with what is
        stored or buffered) are skipped: the first occurrence wins.
        """
        if self._closed:
            raise RuntimeError(f"the writer for {self.directory} is closed")
        raw = [as_key(k) for k in keys]
        records = self.layout.encode(len(raw), tensors)  # validates before anything changes
        rows, batch = [], set()
        for i, (key, seen) in enumerate(zip(raw, self._known.known(raw), strict=True)):
            if not seen and key not in batch:
                batch.add(key)
                rows.append(i)
        if len(rows) < len(raw):
            records = records[rows]
        new_keys = [raw[i] for i in rows]
        if new_keys:
            self._keys.append(keys_array(new_keys))
            self._records.append(records)
            for key in new_keys:
                self._known.add(key)
        while self.pending >= self.shard_records:
            self._flush(self.shard_records)
        return len(new_keys)

    def close(self) -> None:
        """Write what is buffered as a last shard; the writer takes nothing more."""
        if not self._closed and self.pending:
            self._flush(self.pending)
        self._closed = True

    def __enter__(self) -> EmbeddingCacheWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self._keys, self._records, self._closed = [], [], True

    def _flush(self, count: int) -> None:
        path = self.directory / shard_name(self.rank, self._seq)
        while path.exists():  # a shard from a writer of the same rank that started later
            self._seq += 1
            path = self.directory / shard_name(self.rank, self._seq)
        keys, rest_keys = _split(self._keys, count)
        records, rest_records = _split(self._records, count)
        write_shard(path, keys, records, self.layout.record_bytes)
        # Only once the shard is committed does the buffer forget it; a failed write keeps it.
        self._keys, self._records = rest_keys, rest_records
        self._seq += 1


def _split(chunks: Chunks, count: int) -> tuple[Chunks, Chunks]:
    """The first `count` rows of a list of arrays, and the rest."""
    head: Chunks = []
    for i, chunk in enumerate(chunks):
        if count <= len(chunk):
            head.append(chunk[:count])
            tail = [chunk[count:]] if count < len(chunk) else []
            return head, tail + chunks[i + 1 :]
        head.append(chunk)
        count -= len(chunk)
    return head, []
