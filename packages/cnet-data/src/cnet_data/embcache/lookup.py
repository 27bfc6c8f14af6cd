"""The key -> (shard, row) hash table: flat numpy arrays, built vectorised, no object per entry.

Laid out like a CSR matrix. With M, the table size, the power of two at least 2N, a key's slot
is its first 8 bytes (a little-endian uint64; caption keys are hashes, so these bits are
uniform) masked to M - 1. `keys` and `location` hold the entries sorted by slot and the entries
of slot s are rows `starts[s]:starts[s + 1]`, on average at most half an entry per slot. A
lookup is two reads of `starts` and a comparison or two, from RAM or from a memory map alike.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

import attrs
import numpy as np
import numpy.typing as npt

from cnet_data.captions import CAPTION_KEY_BYTES

KEY_DTYPE = np.dtype("<u8")  # a key is two of these; little-endian on every platform


def key_words(keys: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint64]:
    """(n, 16) uint8 keys as (n, 2) little-endian uint64 words (a view when possible)."""
    flat = np.ascontiguousarray(keys, dtype=np.uint8).reshape(len(keys), CAPTION_KEY_BYTES)
    return flat.view(KEY_DTYPE).reshape(len(keys), 2)


@attrs.frozen(eq=False)
class LookupTable:
    """Where each key's record lives; the arrays may be in RAM or memory-mapped."""

    starts: npt.NDArray[np.int64]
    """(M + 1,) first entry of each slot; slot s spans `starts[s]:starts[s + 1]`."""
    keys: npt.NDArray[np.uint64]
    """(N, 2) keys sorted by slot, as little-endian words."""
    location: npt.NDArray[np.uint32]
    """(N, 2) shard index and row of each key's record."""

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def mask(self) -> int:
        return len(self.starts) - 2

    def find(self, key: bytes) -> int:
        """Entry index of one 16-byte key, or -1; plain Python ints, no temporary arrays."""
        k0, k1 = struct.unpack("<QQ", key)
        slot = k0 & self.mask
        for i in range(int(self.starts[slot]), int(self.starts[slot + 1])):
            row = self.keys[i]
            if int(row[0]) == k0 and int(row[1]) == k1:
                return i
        return -1

    def find_many(self, keys: npt.NDArray[np.uint8]) -> npt.NDArray[np.int64]:
        """Entry index of each (n, 16) key, or -1, vectorised over the keys."""
        words = key_words(keys)
        slot = (words[:, 0] & np.uint64(self.mask)).astype(np.int64)
        pos, end = self.starts[slot], self.starts[slot + 1]
        found = np.full(len(words), -1, dtype=np.int64)
        active = np.flatnonzero(pos < end)
        # One pass per entry of the fullest slot probed: a handful of passes at most.
        while len(active):
            cand = self.keys[pos[active]]
            hit = (cand[:, 0] == words[active, 0]) & (cand[:, 1] == words[active, 1])
            found[active[hit]] = pos[active[hit]]
            pos[active] += 1
            active = active[~hit & (pos[active] < end[active])]
        return found


def table_size(n: int) -> int:
    """The power of two at least 2n (and at least 2)."""
    return max(2, 1 << max(0, 2 * n - 1).bit_length())


def build_lookup(
    keys: Sequence[npt.NDArray[np.uint8]],
) -> LookupTable:
    """A table over the keys of several shards (shard i's keys are `keys[i]`, row = position).

    A key present more than once (two ranks that embedded the same caption) keeps its first
    occurrence in shard order: the records are the same encoder's output for the same text.
    """
    counts = [len(k) for k in keys]
    n = sum(counts)
    words = key_words(np.concatenate(keys)) if n else np.zeros((0, 2), KEY_DTYPE)
    shard = np.repeat(np.arange(len(keys), dtype=np.uint32), counts)
    row = np.concatenate([np.arange(c, dtype=np.uint32) for c in counts]) if n else shard
    m = table_size(n)
    slot = words[:, 0] & np.uint64(m - 1)
    # Stable sort by (slot, key): duplicates end up adjacent, first occurrence first.
    order = np.lexsort((words[:, 1], words[:, 0], slot))
    words, slot = words[order], slot[order]
    keep = np.ones(n, dtype=bool)
    keep[1:] = np.any(words[1:] != words[:-1], axis=1)
    words, slot, order = words[keep], slot[keep], order[keep]
    starts = np.searchsorted(slot, np.arange(m + 1, dtype=np.uint64)).astype(np.int64)
    location = np.stack([shard[order], row[order]], axis=1)
    return LookupTable(starts=starts, keys=np.ascontiguousarray(words), location=location)
