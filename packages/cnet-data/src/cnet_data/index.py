"""The compact on-disk dataset index: columns of numbers and packed strings, memory-mapped.

A directory holding `index.json` (format, version, count, and the `store` its samples are read
from: `SampleStore.header()`, e.g. `{"kind": "files", "root": ...}`) and one file per column:
`sizes.npy` (N x 2 int32: height, width after EXIF orientation), `caption_keys.npy` (N x 16
bytes) and, for each of images, conditioning images and captions, a UTF-8 blob with an offsets
array. The image and conditioning columns hold the store's references (for local files, paths
relative to the dataset root). Loading maps the files and creates no Python object per sample,
so a 10-million-sample index opens in milliseconds and costs RAM only for the pages actually read.

Version 2 added the store; an index of version 1 (paths under a `root`) is refused with a
message to re-index, and `is_older_index` lets a launch rebuild it by itself.

`index.json` with `"format": "cnet-data-index"` is the marker by which a folder is known to be
an index: `IndexBuilder.write` replaces only such a folder, and only when it holds nothing but
the index's own files (`INDEX_FILES`); see `cnet_data.outdir` for what it refuses.
"""

from __future__ import annotations

import json
import os
import stat
from array import array
from pathlib import Path
from typing import TypeVar

import attrs
import numpy as np
import numpy.typing as npt
from typing_extensions import override

from cnet_data import outdir
from cnet_data.atomic import write_durably
from cnet_data.captions import caption_key
from cnet_data.errors import CnetError
from cnet_data.local_files import LocalFiles
from cnet_data.source_protocol import SampleStore
from cnet_data.source_registry import store_from_header

INDEX_FORMAT = "cnet-data-index"
INDEX_VERSION = 2
_TEXT_COLUMNS = ("images", "conditioning", "captions")
_T = TypeVar("_T", bound=np.generic)
INDEX_FILES = frozenset(
    {
        "index.json",
        "sizes.npy",
        "caption_keys.npy",
        *(f"{name}.bin" for name in _TEXT_COLUMNS),
        *(f"{name}.offsets.npy" for name in _TEXT_COLUMNS),
    }
)
"""Every file an index folder holds: all that replacing an old index may remove."""
_HEADER_LIMIT = 1 << 20


class IndexFormatError(CnetError, ValueError):
    """An index directory that is missing, from another format version, or damaged.

    A `ValueError` too, so callers that treat bad input that way keep working."""

    exit_code = 2

    def __init__(
        self,
        message: str,
        *,
        hint: str = "build it again with `cnet-data index SOURCE --out DIR`",
    ) -> None:
        super().__init__(message, hint=hint)


class StringColumn:
    """Read-only strings packed in one UTF-8 blob, addressed by an offsets array."""

    def __init__(self, blob: npt.NDArray[np.uint8], offsets: npt.NDArray[np.int64]) -> None:
        self._blob = blob
        self._offsets = offsets

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, i: int) -> str:
        start, end = int(self._offsets[i]), int(self._offsets[i + 1])
        return self._blob[start:end].tobytes().decode("utf-8")


@attrs.frozen
class IndexedSample:
    """Everything the index knows about one sample."""

    image: str
    """The image member's reference in the index's store (`DatasetIndex.store.open`)."""
    conditioning: str
    """The conditioning image member's reference in the index's store."""
    caption: str
    caption_key: str
    """Hex digest of the caption: the embedding cache's key."""
    size: tuple[int, int]
    """(height, width) of the image and of its conditioning image."""


class DatasetIndex:
    """A loaded index; cheap to open, cheap to pickle into DataLoader workers."""

    def __init__(self, directory: Path, *, root: Path | None = None) -> None:
        self.directory = Path(directory)
        header = _read_header(self.directory)
        count = header.get("count")
        if not isinstance(count, int) or count < 0:
            raise IndexFormatError(f"index {self.directory}: bad sample count {count!r}")
        self.count = count
        self._root_override = Path(root) if root is not None else None
        self.store = _store_of(self.directory, header, self._root_override)
        """Where the samples' references are opened (moved to `root` when one is given)."""
        self.header = header
        self.sizes = self._array("sizes.npy", np.int32)
        """(height, width) per sample, after EXIF orientation."""
        self.caption_keys = self._array("caption_keys.npy", np.uint8)
        self._columns = {name: self._strings(name) for name in _TEXT_COLUMNS}
        self._check_shapes()

    def __len__(self) -> int:
        return self.count

    @override
    def __getstate__(self) -> dict[str, object]:
        # Pickling a memory map would copy its data into every DataLoader worker (spawn and
        # forkserver pickle the dataset); send the location instead and map again there.
        return {"directory": self.directory, "root": self._root_override}

    def __setstate__(self, state: dict[str, object]) -> None:
        directory, root = state["directory"], state["root"]
        assert isinstance(directory, Path) and (root is None or isinstance(root, Path))
        self.__init__(directory, root=root)  # type: ignore[misc]

    @property
    def root(self) -> Path:
        """Where the dataset is (the store's root)."""
        return self.store.root

    @property
    def heights(self) -> npt.NDArray[np.int32]:
        return self.sizes[:, 0]

    @property
    def widths(self) -> npt.NDArray[np.int32]:
        return self.sizes[:, 1]

    def caption(self, i: int) -> str:
        """The caption of sample `i`, without building the whole `IndexedSample`."""
        return self._columns["captions"][i]

    def __getitem__(self, i: int) -> IndexedSample:
        if not -self.count <= i < self.count:
            raise IndexError(f"sample {i} is outside the index of {self.count} samples")
        i %= self.count
        h, w = self.sizes[i]
        return IndexedSample(
            image=self._columns["images"][i],
            conditioning=self._columns["conditioning"][i],
            caption=self._columns["captions"][i],
            caption_key=self.caption_keys[i].tobytes().hex(),
            size=(int(h), int(w)),
        )

    def _array(self, name: str, dtype: type[_T]) -> npt.NDArray[_T]:
        path = self.directory / name
        try:
            array_: npt.NDArray[_T] = np.load(path, mmap_mode="r")
        except (OSError, ValueError) as exc:
            raise IndexFormatError(f"index {self.directory}: cannot read {name}: {exc}") from None
        if array_.dtype != np.dtype(dtype):
            raise IndexFormatError(
                f"index {self.directory}: {name} holds {array_.dtype}, expected {np.dtype(dtype)}"
            )
        return array_

    def _strings(self, name: str) -> StringColumn:
        offsets = self._array(f"{name}.offsets.npy", np.int64)
        blob_path = self.directory / f"{name}.bin"
        size = blob_path.stat().st_size if blob_path.exists() else -1
        if size != (int(offsets[-1]) if len(offsets) else 0):
            raise IndexFormatError(
                f"index {self.directory}: {name}.bin has {size} bytes, its offsets say "
                f"{int(offsets[-1]) if len(offsets) else 0}; the index is damaged, re-index"
            )
        blob = np.memmap(blob_path, dtype=np.uint8, mode="r") if size else np.zeros(0, np.uint8)
        return StringColumn(blob, offsets)

    def _check_shapes(self) -> None:
        expected = {
            "sizes.npy": (self.sizes.shape, (self.count, 2)),
            "caption_keys.npy": (self.caption_keys.shape, (self.count, 16)),
        }
        for name, (got, want) in expected.items():
            if got != want:
                raise IndexFormatError(
                    f"index {self.directory}: {name} has shape {got}, want {want}"
                )
        for name, column in self._columns.items():
            if len(column) != self.count:
                raise IndexFormatError(
                    f"index {self.directory}: {name} has {len(column)} entries, want {self.count}"
                )


def _read_header(directory: Path) -> dict[str, object]:
    path = directory / "index.json"
    try:
        header = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise IndexFormatError(
            f"{directory} is not a dataset index (no index.json); run `cnet-data index` first"
        ) from None
    except json.JSONDecodeError as exc:
        raise IndexFormatError(f"index {directory}: index.json is not valid JSON: {exc}") from None
    if not isinstance(header, dict) or header.get("format") != INDEX_FORMAT:
        raise IndexFormatError(f"{path} is not a cnet-data index header")
    if header.get("version") != INDEX_VERSION:
        raise IndexFormatError(
            f"index {directory} has version {header.get('version')}, this cnet-data reads "
            f"version {INDEX_VERSION} (version 2 records the store its samples are read "
            "from); re-index the dataset (a training launch rebuilds an older index itself)"
        )
    return header


def _store_of(directory: Path, header: dict[str, object], root: Path | None) -> SampleStore:
    described = header.get("store")
    if not isinstance(described, dict):
        raise IndexFormatError(f"index {directory}: index.json names no sample store")
    try:
        return store_from_header(described, root=root)
    except ValueError as exc:
        hint = exc.hint if isinstance(exc, CnetError) else "re-index the dataset"
        raise IndexFormatError(f"index {directory}: {exc}", hint=hint) from None


class IndexBuilder:
    """Accumulates samples in compact columns (no object per sample) and writes them atomically.

    `store` is where the references added are opened; without one, `write` needs `root` and
    the references are paths under it (`LocalFiles`)."""

    def __init__(self, store: SampleStore | None = None) -> None:
        self.store = store
        self._sizes = array("i")
        self._keys = bytearray()
        self._blobs = {name: bytearray() for name in _TEXT_COLUMNS}
        self._offsets = {name: array("q", [0]) for name in _TEXT_COLUMNS}

    def __len__(self) -> int:
        return len(self._sizes) // 2

    def add(self, image: str, conditioning: str, caption: str, height: int, width: int) -> None:
        self._sizes.extend((height, width))
        self._keys += caption_key(caption)
        for name, text in zip(_TEXT_COLUMNS, (image, conditioning, caption), strict=True):
            self._blobs[name] += text.encode("utf-8")
            self._offsets[name].append(len(self._blobs[name]))

    def write(
        self,
        directory: Path,
        *,
        root: Path | None = None,
        extra: dict[str, object] | None = None,
    ) -> None:
        """Write the index to `directory`: a new or empty folder, or over an older index.

        `root` moves the builder's store there (or, for a builder without one, makes the
        references paths under it). Anything else at `directory` is refused before any work is
        done (`outdir.OutputPathError`), so a mistyped path costs nothing. The index is staged
        beside and renamed in whole, so a crash leaves the old index or the new one, and the
        next write cleans the leftover.
        """
        directory = Path(directory)
        store = self._store(root)
        directory.parent.mkdir(parents=True, exist_ok=True)
        outdir.claim_directory(directory, INDEX_OWNERSHIP)
        outdir.clean_stale(directory, INDEX_OWNERSHIP)
        staging = outdir.new_staging(directory)
        try:
            self._write_columns(staging)
            header = {
                "format": INDEX_FORMAT,
                "version": INDEX_VERSION,
                "store": dict(store.header()),
                "count": len(self),
                **(extra or {}),
            }
            _write_blob(staging / "index.json", json.dumps(header, indent=2).encode("utf-8"))
            outdir.commit_directory(staging, directory, INDEX_OWNERSHIP)
        except BaseException:
            outdir.remove_owned(staging, INDEX_OWNERSHIP)
            raise

    def _store(self, root: Path | None) -> SampleStore:
        if root is not None:
            moved = Path(root).absolute()
            return self.store.relocated(moved) if self.store is not None else LocalFiles(moved)
        if self.store is None:
            raise ValueError("IndexBuilder.write needs root= for a builder made without a store")
        return self.store

    def _write_columns(self, out: Path) -> None:
        n = len(self)
        _save(out / "sizes.npy", np.frombuffer(self._sizes, dtype=np.int32).reshape(n, 2))
        _save(out / "caption_keys.npy", np.frombuffer(self._keys, np.uint8).reshape(n, 16))
        for name in _TEXT_COLUMNS:
            _write_blob(out / f"{name}.bin", self._blobs[name])
            _save(out / f"{name}.offsets.npy", np.frombuffer(self._offsets[name], np.int64))


def _write_blob(path: Path, data: bytes | bytearray) -> None:
    write_durably(path, lambda fh: fh.write(data))


def _save(path: Path, values: npt.NDArray[np.generic]) -> None:
    write_durably(path, lambda fh: np.save(fh, values, allow_pickle=False))


def is_index_directory(path: Path) -> bool:
    """Whether `path` is a folder carrying the index marker (any version): ours to replace."""
    header = path / "index.json"
    try:
        info = os.lstat(header)
        if not stat.S_ISREG(info.st_mode) or info.st_size > _HEADER_LIMIT:
            return False
        content = json.loads(header.read_bytes())
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(content, dict) and content.get("format") == INDEX_FORMAT


def is_older_index(path: Path) -> bool:
    """Whether `path` holds an index written by an older cnet-data (a lower version), which a
    launch replaces by re-indexing rather than failing."""
    if not is_index_directory(path):
        return False
    version = json.loads((path / "index.json").read_bytes()).get("version")
    return isinstance(version, int) and version < INDEX_VERSION


INDEX_OWNERSHIP = outdir.Ownership("a cnet-data index", INDEX_FILES, is_index_directory)
"""What `IndexBuilder.write` may replace: a folder with the index marker and only its files."""
