"""The contract between a dataset source, the scan, the index and the dataset.

A source has two sides, so that what is read once at indexing time and what is read at every
training step stay apart:

- `SampleSource` (scan side): reads what the user points at (a manifest, a folder, ...) and
  yields one `SourceRecord` per entry: the references of the image and conditioning members, a
  caption (or the reference of a member holding it), or the problem that makes it unusable.
- `SampleStore` (read side): turns a reference back into bytes (`open`). It is small and
  picklable, so the scan's worker processes probe headers through it, and the index keeps it
  (`header()`, rebuilt by the registry's `store_from_header`) so that the dataset opens each
  sample through it instead of joining a path to a root.

The index stores each sample's references as strings the store defines: for local files, the
path relative to the dataset root. A new kind (Hugging Face rows, tar shard byte ranges) is a
source and a store registered in `cnet_data.source_registry`; the scan, the index and the
dataset do not change.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import BinaryIO, Protocol

import attrs

from cnet_data.jsonlines import LineCount


@attrs.frozen
class SourceRecord:
    """One entry of a source, before its members are looked at."""

    where: str
    """Where the entry comes from, for reports: `manifest.jsonl:12` or a relative image path."""
    image: str
    """The image member's reference (for local files, its path relative to the dataset root,
    POSIX separators); the raw value, shortened, when the entry is bad."""
    conditioning: str
    """The conditioning image member's reference, like `image`."""
    caption: object = None
    """The caption as the source holds it; anything but `str` is a bad sample."""
    caption_member: str | None = None
    """The reference of a member holding the caption (a sidecar file); overrides `caption`."""
    problem: tuple[str, str] | None = None
    """(kind, reason) when the entry itself is already known to be bad."""
    size: tuple[int, int] | None = None
    """(height, width) of the image and its conditioning image, where the source records it
    (a tar shard's `KEY.json`); the scan uses it instead of reading headers under
    `verify: metadata`."""


class SampleStore(Protocol):
    """Where indexed references are read back from; picklable and cheap to copy."""

    @property
    def kind(self) -> str:
        """The name the store is registered under (`source_registry.STORE_KINDS`)."""
        ...

    @property
    def root(self) -> Path:
        """Where the dataset is: the folder the references are relative to."""
        ...

    def open(self, reference: str) -> BinaryIO:
        """The member's bytes as a seekable binary file (a context manager); raises
        `FileNotFoundError` when the member is gone, another `OSError` when it is unreadable."""
        ...

    def describe(self, reference: str) -> str:
        """The member named for a person (a log line, an error): e.g. its full path."""
        ...

    def relocated(self, root: Path) -> SampleStore:
        """The same store with the dataset moved to `root` (the index was copied elsewhere)."""
        ...

    def header(self) -> Mapping[str, object]:
        """The JSON-able settings `store_from_header` rebuilds this store from, `kind` included."""
        ...


def header_root(header: Mapping[str, object], kind: str) -> Path:
    """The root folder an index header records for a store of `kind`; `ValueError` naming
    what is missing (every store keeps its dataset root under `root`)."""
    root = header.get("root")
    if not isinstance(root, str) or not root:
        raise ValueError(f"a {kind!r} store needs a root folder, got {root!r}")
    return Path(root)


class SampleSource(Protocol):
    """What a user points at, read into records; built from `SourceConfig` by the registry."""

    @property
    def store(self) -> SampleStore:
        """Where the references of this source's records are opened."""
        ...

    @property
    def counts_lines(self) -> bool:
        """Whether the source is read line by line (its report then counts lines read)."""
        ...

    def records(self, count: LineCount) -> Iterator[SourceRecord]:
        """Every entry, in a stable order (a resumed run relies on the index order); lines read
        are tallied in `count`. Raises `SourceError` when the source is not there at all."""
        ...
