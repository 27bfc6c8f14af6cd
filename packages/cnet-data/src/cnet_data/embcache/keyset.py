"""The set of keys a writer must not store again, kept compact however many there are."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from cnet_data.embcache.format import keys_array
from cnet_data.embcache.lookup import LookupTable, build_lookup

_RECENT_LIMIT = 65536


class KeySet:
    """Keys already in the cache plus those added since, with few Python objects.

    New keys go into a small Python set; when it fills up it becomes a lookup table, merged with
    the smaller tables so that sizes halve from one level to the next (a binary counter). A
    writer that adds 10 million keys thus holds a dozen numpy tables, not 10 million `bytes`,
    and pays O(log N) amortised work per key.
    """

    def __init__(self, existing: LookupTable) -> None:
        self._levels = [existing] if len(existing) else []
        self._recent: set[bytes] = set()

    def __len__(self) -> int:
        return len(self._recent) + sum(len(t) for t in self._levels)

    def __contains__(self, key: bytes) -> bool:
        return key in self._recent or any(t.find(key) >= 0 for t in self._levels)

    def known(self, keys: Sequence[bytes]) -> npt.NDArray[np.bool_]:
        """Whether each 16-byte key is in the set, vectorised over the tables."""
        known = np.array([k in self._recent for k in keys], dtype=bool).reshape(len(keys))
        if self._levels and len(keys):
            array = keys_array(keys)
            for table in self._levels:
                known |= table.find_many(array) >= 0
        return known

    def add(self, key: bytes) -> None:
        self._recent.add(key)
        if len(self._recent) >= _RECENT_LIMIT:
            self._compact()

    def _compact(self) -> None:
        parts = [keys_array(sorted(self._recent))]
        size = len(self._recent)
        while self._levels and len(self._levels[-1]) <= size:
            table = self._levels.pop()
            parts.append(table.keys.view(np.uint8).reshape(len(table), 16))
            size += len(table)
        self._levels.append(build_lookup(parts))
        self._recent.clear()
