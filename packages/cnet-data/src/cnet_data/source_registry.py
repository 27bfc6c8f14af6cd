"""The source and store kinds, by name: where a new kind of dataset is plugged in.

`SOURCE_KINDS` maps a `data.source.format` name to what builds its `SampleSource` from the
`SourceConfig`; `STORE_KINDS` maps a store name (written in every index's header) to what
rebuilds its `SampleStore` from that header. A new kind registers one of each
(`register_source`, `register_store`); the three local-file sources share the
`files` store; `tar` and `hf` have their own.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TypeVar

from cnet_data.errors import CnetError
from cnet_data.folder_source import FolderSource
from cnet_data.hf_rows import STORE_KIND as HF
from cnet_data.hf_rows import HfRows, HfRowSource
from cnet_data.local_files import STORE_KIND as FILES
from cnet_data.local_files import LocalFiles
from cnet_data.manifest_source import ManifestSource
from cnet_data.source_protocol import SampleSource, SampleStore
from cnet_data.sources import SourceConfig
from cnet_data.tar_shards import STORE_KIND as TAR
from cnet_data.tar_shards import TarShards, TarShardSource

SourceFactory = Callable[[SourceConfig], SampleSource]
StoreFactory = Callable[[Mapping[str, object]], SampleStore]
_F = TypeVar("_F")

SOURCE_KINDS: dict[str, SourceFactory] = {
    "jsonl": ManifestSource.jsonl,
    "folder": FolderSource,
    "prompt_json": ManifestSource.prompt_json,
    "tar": TarShardSource,
    "hf": HfRowSource,
}
"""Every source kind `data.source.format` may name, and how its source is built."""
STORE_KINDS: dict[str, StoreFactory] = {
    FILES: LocalFiles.from_header,
    TAR: TarShards.from_header,
    HF: HfRows.from_header,
}
"""Every store kind an index header may name, and how the store is rebuilt from the header."""


class UnknownKindError(CnetError, ValueError):
    """A source or store kind that nothing is registered under."""

    exit_code = 2


def register_source(kind: str, factory: SourceFactory) -> None:
    """Make `format: KIND` build its source with `factory`; a kind is registered once."""
    _register(SOURCE_KINDS, "source", kind, factory)


def register_store(kind: str, factory: StoreFactory) -> None:
    """Make an index whose header names store `kind` open its samples with `factory`."""
    _register(STORE_KINDS, "store", kind, factory)


def _register(table: dict[str, _F], what: str, kind: str, factory: _F) -> None:
    if kind in table and table[kind] is not factory:
        raise ValueError(f"a {what} kind {kind!r} is already registered")
    table[kind] = factory


def source_for(config: SourceConfig) -> SampleSource:
    """The source `config` describes, by its (detected) format."""
    kind = config.resolved_format
    factory = SOURCE_KINDS.get(kind)
    if factory is None:
        raise UnknownKindError(
            f"data.source.format {kind!r} is not a known source kind",
            hint=f"use one of {', '.join(SOURCE_KINDS)}",
        )
    return factory(config)


def store_from_header(header: Mapping[str, object], *, root: Path | None = None) -> SampleStore:
    """The store an index header describes (`ValueError` naming what is wrong); with `root`,
    moved there."""
    kind = header.get("kind")
    factory = STORE_KINDS.get(kind) if isinstance(kind, str) else None
    if factory is None:
        raise UnknownKindError(
            f"the index's samples are in a store of kind {kind!r}, which this cnet-data does "
            f"not read (it reads {', '.join(STORE_KINDS)})",
            hint="install the cnet-data extra that reads it, or re-index the dataset",
        )
    store = factory(header)
    return store.relocated(root) if root is not None else store
