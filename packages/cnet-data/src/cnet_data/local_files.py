"""`LocalFiles`: the store of every local source, whose references are paths under a root.

A reference is a POSIX path relative to the dataset root, already checked not to leave it
(`cnet_data.sources.inside_root`) when the source read it. Opening joins it to the root at read
time, so an index moved with its dataset (`DatasetIndex(directory, root=...)`) still opens.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import BinaryIO

import attrs

from cnet_data.source_protocol import header_root

STORE_KIND = "files"
"""The name `LocalFiles` is registered under, and written in an index's header."""


@attrs.frozen
class LocalFiles:
    """Members are files under `root`, named by their relative path."""

    root: Path
    """The dataset root, absolute."""

    @property
    def kind(self) -> str:
        return STORE_KIND

    def path(self, reference: str) -> Path:
        """The file a reference names (for tools that need a path, such as benchmarks)."""
        return self.root / reference

    def open(self, reference: str) -> BinaryIO:
        return open(self.root / reference, "rb")

    def describe(self, reference: str) -> str:
        return str(self.root / reference)

    def relocated(self, root: Path) -> LocalFiles:
        return LocalFiles(Path(root).absolute())

    def header(self) -> Mapping[str, object]:
        return {"kind": STORE_KIND, "root": str(self.root)}

    @classmethod
    def from_header(cls, header: Mapping[str, object]) -> LocalFiles:
        """The store an index header describes; `ValueError` naming what is missing."""
        return cls(header_root(header, STORE_KIND))
