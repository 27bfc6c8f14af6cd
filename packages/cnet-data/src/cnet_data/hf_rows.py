"""The `hf` source: a Hugging Face dataset's rows, as parquet or arrow files.

What diffusers' ControlNet example trains from (the fill50k layout: `image`,
`conditioning_image` and `text` columns) is read where it lies, without the `datasets` library:
- parquet files, as the hub serves them (`data/train-00000-of-00001.parquet`) or
  `Dataset.to_parquet` writes them;
- a folder `Dataset.save_to_disk` wrote (`data-00000-of-00001.arrow`, memory-mapped);
- a hub id, `url: hf://datasets/OWNER/NAME`, downloaded to `path` first (needs a network).

Image columns hold the `datasets` Image feature (a struct of `bytes` and `path`; a row with
only a path reads that file, relative to the dataset root) or plain binary. The columns are
`image_key`, `conditioning_key` and `caption_key`; in a folder with several splits, `split`
picks the files (by a path part or a `SPLIT-` name prefix).

The index keeps each image as `FILE:ROW:COLUMN` (`HfRows.reference`). An arrow file is
memory-mapped, so a row is read in O(1); a parquet file is read a row group at a time (the hub
writes 100 image rows per group), kept in a small per-process cache: exact, but a random read
costs a row group, so at scale prefer tar shards. Needs `pyarrow` (`pip install cnet-data[hf]`).
"""

from __future__ import annotations

import bisect
import io
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import attrs

from cnet_data.jsonlines import LineCount
from cnet_data.source_protocol import SourceRecord, header_root
from cnet_data.sources import SourceConfig, SourceError, inside_root, require_exists

if TYPE_CHECKING:
    import pyarrow as pa

STORE_KIND = "hf"
"""The name `HfRows` is registered under, and written in an index's header."""
ROW_SUFFIXES = (".parquet", ".arrow")
_REFERENCE = re.compile(r"(?P<file>[^:]+):(?P<row>\d+):(?P<column>.+)", re.S)
_HUB_PREFIX = "hf://datasets/"


def _pyarrow() -> None:
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        raise SourceError(
            "reading a Hugging Face dataset needs pyarrow",
            hint="pip install 'cnet-data[hf]'",
        ) from None


@attrs.frozen
class HfRows:
    """Members are cells of the row files under `root`, named by `reference`."""

    root: Path
    """The folder holding the dataset's parquet or arrow files, absolute."""

    @property
    def kind(self) -> str:
        return STORE_KIND

    @staticmethod
    def reference(file: str, row: int, column: str) -> str:
        return f"{file}:{row}:{column}"

    @staticmethod
    def cell(reference: str) -> tuple[str, int, str]:
        """The (file, row, column) a reference names; `ValueError` when it is not one."""
        found = _REFERENCE.fullmatch(reference)
        if found is None:
            raise ValueError(f"{reference!r} is not a dataset cell (FILE:ROW:COLUMN)")
        return found["file"], int(found["row"]), found["column"]

    def open(self, reference: str) -> BinaryIO:
        file, row, column = self.cell(reference)
        value = _row_file(self.root / file).value(row, column)
        if isinstance(value, dict):
            data, path = value.get("bytes"), value.get("path")
            if data is None and isinstance(path, str) and path:
                return open(self._kept_as_path(path, row, file), "rb")
            value = data
        if not isinstance(value, bytes):
            raise OSError(f"row {row} of {file} has no {column} bytes ({type(value).__name__})")
        return io.BytesIO(value)

    def _kept_as_path(self, path: str, row: int, file: str) -> Path:
        """Where an Image feature kept as a path (not embedded: `to_parquet` and
        `save_to_disk` of a dataset built from local files) is: an absolute path as the
        dataset names it, a relative one under the root and never out of it."""
        if os.path.isabs(path):
            return Path(path)
        inside = inside_root(self.root, path)
        if inside is None:
            raise OSError(f"row {row} of {file} names {path!r}, outside {self.root}")
        return self.root / inside

    def describe(self, reference: str) -> str:
        file, row, column = self.cell(reference)
        return f"{self.root / file} row {row} column {column}"

    def relocated(self, root: Path) -> HfRows:
        return HfRows(Path(root).absolute())

    def header(self) -> Mapping[str, object]:
        return {"kind": STORE_KIND, "root": str(self.root)}

    @classmethod
    def from_header(cls, header: Mapping[str, object]) -> HfRows:
        """The store an index header describes; `ValueError` naming what is missing."""
        return cls(header_root(header, STORE_KIND))


class _RowFile:
    """One parquet or arrow file, opened once per process."""

    def __init__(self, path: Path) -> None:
        _pyarrow()
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.path = path
        self._table: pa.Table | None = None
        self._parquet: pq.ParquetFile | None = None
        try:
            self._open(path)
        except pa.ArrowException as exc:
            raise SourceError(
                f"dataset file {path} cannot be read by pyarrow: {exc}",
                hint="a file a few hundred bytes long is a Git LFS pointer: run git lfs pull",
            ) from None

    def _open(self, path: Path) -> None:
        import pyarrow.parquet as pq

        if path.suffix == ".parquet":
            self._parquet = pq.ParquetFile(path)
            meta = self._parquet.metadata
            self.schema = self._parquet.schema_arrow
            sizes = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
            self._starts = [sum(sizes[:g]) for g in range(len(sizes))]
            self.rows = sum(sizes)
        else:
            self._table = _read_arrow(path)
            self.schema, self.rows = self._table.schema, self._table.num_rows

    def column(self, name: str) -> list[object]:
        """A whole column (the captions), read once by the source."""
        if self._table is not None:
            return list(self._table.column(name).to_pylist())
        assert self._parquet is not None
        return list(self._parquet.read(columns=[name]).column(name).to_pylist())

    def value(self, row: int, column: str) -> object:
        if not 0 <= row < self.rows:
            raise OSError(f"{self.path} has {self.rows} rows, not row {row} (changed since?)")
        if self._table is not None:
            return self._table.column(column)[row].as_py()
        group = bisect.bisect_right(self._starts, row) - 1
        return self._group(group, column)[row - self._starts[group]].as_py()

    def _group(self, group: int, column: str) -> pa.ChunkedArray[Any]:
        """A row group's column, from the most recently read of this process (a scan chunk,
        or a batch, reads neighbouring rows), kept under `GROUP_CACHE_BYTES` in all."""
        import pyarrow as pa

        key = (os.getpid(), self.path, group, column)
        with _FILES_LOCK:
            cached = _GROUPS.get(key)
            if cached is not None:
                _GROUPS.move_to_end(key)
                return cached
        assert self._parquet is not None
        try:
            cached = self._parquet.read_row_group(group, columns=[column]).column(column)
        except pa.ArrowException as exc:
            raise OSError(f"row group {group} of {self.path} cannot be read: {exc}") from None
        with _FILES_LOCK:
            _GROUPS[key] = cached
            while len(_GROUPS) > 1 and sum(c.nbytes for c in _GROUPS.values()) > GROUP_CACHE_BYTES:
                _GROUPS.popitem(last=False)
        return cached


def _read_arrow(path: Path) -> pa.Table:
    """An arrow file, memory-mapped: the IPC stream `save_to_disk` writes, or an IPC file."""
    import pyarrow as pa

    source = pa.memory_map(str(path), "r")
    try:
        return pa.ipc.open_file(source).read_all()
    except pa.ArrowInvalid:
        source.seek(0)
        return pa.ipc.open_stream(source).read_all()


_FILES: OrderedDict[tuple[int, Path, int, int], _RowFile] = OrderedDict()
_GROUPS: OrderedDict[tuple[int, Path, int, str], pa.ChunkedArray[Any]] = OrderedDict()
GROUP_CACHE_BYTES = 256 * 2**20
"""The most parquet row-group data a process keeps for the next reads."""
_FILES_LOCK = threading.Lock()


def _row_file(path: Path) -> _RowFile:
    """`path` opened, kept for the next read (the 16 most recent), per process and per inode
    and modification time (a file replaced since is opened afresh)."""
    try:
        stat = os.stat(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"dataset file {path} does not exist") from None
    key = (os.getpid(), path, stat.st_ino, stat.st_mtime_ns)
    with _FILES_LOCK:
        found = _FILES.get(key)
        if found is None:
            found = _FILES[key] = _RowFile(path)
            if len(_FILES) > 16:
                _FILES.popitem(last=False)
        _FILES.move_to_end(key)
        return found


def row_files(config: SourceConfig) -> list[Path]:
    """The dataset files `config.path` names: itself when it is a file, else the parquet or
    arrow files under it of `config.split` (all of them when none is marked with a split), in
    name order (the index order, which a resumed run relies on)."""
    if config.url is not None:
        _download(config)
    require_exists(config)
    path = config.path.absolute()
    if path.is_file():
        return [path]
    found = _data_files(path)
    if not found:
        raise SourceError(
            f"dataset folder {path} holds no .parquet or .arrow file",
            hint="point data.source.path at a dataset saved with save_to_disk or to_parquet, "
            "or at its parquet files",
        )
    of_split = [p for p in found if _in_split(p.relative_to(path), config.split)]
    splits_in_folders = (path / "dataset_dict.json").is_file()
    marked = {s for p in found for s in _split_marks(p.relative_to(path), splits_in_folders)}
    if not of_split and marked:
        raise SourceError(
            f"dataset folder {path} has no split {config.split!r}",
            hint=f"it has {', '.join(sorted(marked))}: set data.source.split (--split)",
        )
    return of_split or found


def _data_files(folder: Path) -> list[Path]:
    """The row files under `folder`, without `datasets`' own caches (`cache-*.arrow`, written
    next to a saved dataset when it is mapped) and an image folder's `metadata.parquet`."""
    found = sorted(p for p in folder.rglob("*") if p.suffix in ROW_SUFFIXES and p.is_file())
    return [p for p in found if not p.name.startswith("cache-") and p.stem != "metadata"]


_SPLIT_FILE = re.compile(r"(?P<split>[A-Za-z][\w.]*?)-\d+-of-\d+\.")


_SPLIT_NAMES = {"train", "test", "validation", "valid", "val", "dev"}


def _split_marks(relative: Path, splits_in_folders: bool) -> set[str]:
    """The splits a file's path marks: `train-00000-of-00001.parquet`, a folder with a split's
    usual name, or any folder of a `DatasetDict` saved with `save_to_disk` (which writes
    `dataset_dict.json`)."""
    named = _SPLIT_FILE.match(relative.name)
    folders = set(relative.parts[:-1])
    # `save_to_disk` names a split's own shards `data-00000-of-00001.arrow`.
    marks = {named["split"]} if named and named["split"] != "data" else set()
    return marks | (folders if splits_in_folders else folders & _SPLIT_NAMES)


def _in_split(relative: Path, split: str) -> bool:
    return split in relative.parts[:-1] or relative.name.startswith((f"{split}-", f"{split}."))


def _download(config: SourceConfig) -> None:
    """Fetch a hub dataset's data files into `config.path` (skipped when already there)."""
    url = config.url or ""
    if not url.startswith(_HUB_PREFIX):
        raise SourceError(
            f"data.source.url {url!r} is not a hub dataset for format hf",
            hint=f"write it as {_HUB_PREFIX}OWNER/NAME",
        )
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        hint = "pip install 'cnet-data[hf]'"
        raise SourceError("a hub dataset needs huggingface_hub", hint=hint) from None
    patterns = ["*.parquet", "*.arrow", "**/*.parquet", "**/*.arrow", "*.json"]
    snapshot_download(
        url.removeprefix(_HUB_PREFIX),
        repo_type="dataset",
        local_dir=config.path,
        allow_patterns=patterns,
    )


@attrs.frozen
class HfRowSource:
    """One sample per row of the dataset's files."""

    config: SourceConfig

    @property
    def store(self) -> HfRows:
        return HfRows(self.config.root)

    @property
    def counts_lines(self) -> bool:
        return False

    def records(self, count: LineCount) -> Iterator[SourceRecord]:
        root = self.config.root
        for path in row_files(self.config):
            yield from self._file_records(_row_file(path), path.relative_to(root).as_posix())

    def _file_records(self, rows: _RowFile, file: str) -> Iterator[SourceRecord]:
        if ":" in file:
            reason = "dataset file path has a ':'; rename it"
            yield SourceRecord(file, "", "", problem=("bad_file_name", reason))
            return
        config = self.config
        self._check_columns(rows, file)
        captions = rows.column(config.caption_key)
        for row, caption in enumerate(captions):
            yield SourceRecord(
                f"{file}:{row}",
                HfRows.reference(file, row, config.image_key),
                HfRows.reference(file, row, config.conditioning_key),
                caption=caption,
            )

    def _check_columns(self, rows: _RowFile, file: str) -> None:
        config, names = self.config, rows.schema.names
        wanted = (config.image_key, config.conditioning_key, config.caption_key)
        missing = [name for name in wanted if name not in names]
        if missing:
            raise SourceError(
                f"dataset file {file} has no column {', '.join(map(repr, missing))} "
                f"(it has {', '.join(names)})",
                hint="name the columns with image_key, conditioning_key and caption_key "
                "(--image-key ... on the command line)",
            )
