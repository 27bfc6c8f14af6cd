"""The memory-mapped text-embedding cache.

A directory of `header.json` (format, encoder fingerprint, fields), fixed-size-record shards
written by `EmbeddingCacheWriter` (one name per rank, atomic per shard, resumable) and, after
`finalize`, a `lookup.bin` hash table. `EmbeddingCache` reads it with O(1) lookups, flat RAM and
forked DataLoader workers in mind.
"""

from cnet_data.embcache.format import (
    CACHE_FORMAT,
    CACHE_VERSION,
    STORAGE_DTYPES,
    CacheCorruptError,
    CacheError,
    CacheMismatchError,
    FieldSpec,
)
from cnet_data.embcache.lookup_file import finalize
from cnet_data.embcache.reader import EmbeddingCache
from cnet_data.embcache.writer import EmbeddingCacheWriter

__all__ = [
    "CACHE_FORMAT",
    "CACHE_VERSION",
    "STORAGE_DTYPES",
    "CacheCorruptError",
    "CacheError",
    "CacheMismatchError",
    "EmbeddingCache",
    "EmbeddingCacheWriter",
    "FieldSpec",
    "finalize",
]
