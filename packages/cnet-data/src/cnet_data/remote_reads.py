"""Ranged reads of files at fsspec URLs, and a bounded local read-through cache of them.

Tar shards on object storage (`s3://`, `gs://`, `https://`, any fsspec protocol) are read a
member at a time: each read is one ranged request for exactly the member's bytes, as the index
recorded them. With a cache, a member read once is kept as a file under the cache folder and
read from there afterwards; the cache is kept under its bound by removing the least recently
read members (each process checks after writing a sixteenth of the bound, so the folder may
exceed it by that much per loader process). The cache assumes a shard does not change under
its URL: replace a shard, and re-index and clear the cache. Needs fsspec
(`pip install cnet-data[remote]`) and the protocol's package (s3fs, gcsfs, ...).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Protocol, cast

import attrs

from cnet_data.sources import SourceError


class AbstractFileSystem(Protocol):
    """What cnet uses of an fsspec filesystem (fsspec ships no type information; this is the
    one place that knows its methods)."""

    def cat_file(self, path: str, start: int, end: int) -> bytes: ...
    def isfile(self, path: str) -> bool: ...
    def find(self, path: str) -> list[str]: ...
    def open(self, path: str, mode: str) -> IO[bytes]: ...
    def size(self, path: str) -> int: ...


_FILESYSTEMS: dict[tuple[int, str], tuple[AbstractFileSystem, str]] = {}
_LOCK = threading.Lock()


def filesystem(url: str) -> tuple[AbstractFileSystem, str]:
    """The fsspec filesystem of `url` and the path on it, one per process (a forked loader
    worker must not share its parent's connections)."""
    key = (os.getpid(), url)
    with _LOCK:
        found = _FILESYSTEMS.get(key)
        if found is None:
            try:
                core = importlib.import_module("fsspec.core")
            except ImportError:
                hint = "pip install 'cnet-data[remote]' (and s3fs, gcsfs, ... for the protocol)"
                raise SourceError(f"reading {url} needs fsspec", hint=hint) from None
            fs, path = core.url_to_fs(url)
            found = _FILESYSTEMS[key] = (cast(AbstractFileSystem, fs), str(path))
        return found


def join(url: str, relative: str) -> str:
    """`relative` under `url`; `url` itself for `""` (the URL is the one file)."""
    return f"{url.rstrip('/')}/{relative}" if relative else url


def ranged_read(url: str, offset: int, size: int) -> bytes:
    """`size` bytes of `url` from `offset`: one ranged request (none for an empty member:
    a zero-length range is not one every server reads as such)."""
    if size == 0:
        return b""
    fs, path = filesystem(url)
    return bytes(fs.cat_file(path, start=offset, end=offset + size))


def list_files(url: str, suffix: str) -> list[str]:
    """The files under `url` (or `url` itself) whose name ends in `suffix`, relative to it,
    in name order."""
    fs, root = filesystem(url)
    # Only a name with the suffix is one file: an https "folder" is a page that exists too.
    if root.endswith(suffix) and fs.isfile(root):
        return [""]
    root = root.rstrip("/")
    found = [p for p in fs.find(root) if p.endswith(suffix)]
    return sorted(p[len(root) :].lstrip("/") for p in found)


def open_remote(url: str) -> tuple[IO[bytes], int]:
    """`url` opened for reading (a seekable, buffered remote file) and its size."""
    fs, path = filesystem(url)
    return fs.open(path, "rb"), int(fs.size(path))


@attrs.define
class ReadThroughCache:
    """Members kept as files under `folder`, at most about `max_bytes` of them."""

    folder: Path
    max_bytes: int
    _written: int = attrs.field(default=-1, init=False)
    """Bytes written by this process since it last measured the folder (-1: never)."""

    def read(self, key: str, fetch: Callable[[], bytes], size: int) -> bytes:
        """The `size` bytes cached under `key`, or `fetch()`'s, kept for the next read."""
        path = self._path(key)
        try:
            data = path.read_bytes()
            if len(data) == size:  # else cut short by a crash: fetched again
                os.utime(path)  # the modification time orders removal: least recent first
                return data
        except FileNotFoundError:
            pass
        data = fetch()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            _replace_quickly(path, data)
        except OSError:  # a full or read-only disk: the read still succeeds, uncached
            return data
        first = self._written < 0  # this process has not measured the folder yet
        self._written = max(self._written, 0) + len(data)
        if first or self._written >= self.max_bytes // 16:
            self.trim()
        return data

    def _path(self, key: str) -> Path:
        digest = hashlib.sha256(key.encode()).hexdigest()
        return self.folder / digest[:2] / digest

    def trim(self) -> int:
        """Remove the least recently read members until the folder is under its bound; the
        bytes it holds afterwards."""
        self._written = 0
        entries = sorted(_cached_files(self.folder))
        total = sum(size for _, size, _ in entries)
        for _, size, path in entries:
            if total <= self.max_bytes:
                break
            with contextlib.suppress(FileNotFoundError):  # another process removed it first
                os.unlink(path)
            total -= size
        return total


def _replace_quickly(path: Path, data: bytes) -> None:
    """Write `data` at `path` through a temporary file and a rename, so that a reader sees
    the whole member or none; not synced to disk (a cache: a member cut short by a power
    loss has the wrong size and is fetched again), which keeps a member write cheap."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _cached_files(folder: Path) -> Iterator[tuple[int, int, str]]:
    """(modification time, size, path) of every cached member under `folder`."""
    if not folder.is_dir():
        return
    for sub in os.scandir(folder):
        if not sub.is_dir():
            continue
        for entry in os.scandir(sub.path):
            if entry.is_file() and not entry.name.startswith("."):
                try:
                    stat = entry.stat()
                except FileNotFoundError:
                    continue
                yield stat.st_mtime_ns, stat.st_size, entry.path
