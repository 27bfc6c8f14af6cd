"""Durable, atomic writes: the one place cnet-data and cnet-train write, fsync and rename.

A file is written under a temporary name in its own folder, flushed and fsynced, renamed over its
final name, and then the folder is fsynced: readers see the old content or the new, never a part,
and the new name survives a power loss, not only a killed process. The temporary name is in the
same folder because a rename is atomic only within one filesystem (`$TMPDIR` may be another).

cnet-models cannot import cnet-data, so it keeps its own folder writer (`cnet_models.atomic`);
everything above cnet-data (cnet-train) writes through this module.
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

__all__ = [
    "atomic_open",
    "atomic_write_bytes",
    "atomic_write_text",
    "fsync_path",
    "fsync_tree",
    "publish_once",
    "rename_durably",
    "write_durably",
]

# What fsync of a folder raises on filesystems that cannot sync one (some network and FUSE
# mounts): the names are then as durable as that filesystem makes them, which is all we can do.
_CANNOT_SYNC_FOLDER = (errno.EINVAL, errno.ENOTSUP, errno.EBADF)


def fsync_path(path: Path) -> None:
    """fsync one file or folder (a folder's fsync makes the names in it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as exc:
        if not (exc.errno in _CANNOT_SYNC_FOLDER and os.path.isdir(path)):
            raise
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    """fsync every file and folder under `path` (or `path` itself, a file)."""
    if not path.is_dir():
        fsync_path(path)
        return
    for root, _dirs, files in os.walk(path):
        for name in files:
            fsync_path(Path(root) / name)
        fsync_path(Path(root))


def rename_durably(source: Path, target: Path) -> None:
    """Rename the complete, fsynced `source` (file or folder) over `target`, then fsync the
    folder so that the new name is durable too. A folder replaces only an empty folder."""
    os.replace(source, target)
    fsync_path(Path(target).parent)


@contextlib.contextmanager
def _staged(path: Path, publish: Callable[[str, Path], None]) -> Iterator[IO[bytes]]:
    """A temporary file beside `path`; when the block succeeds it is fsynced and handed to
    `publish(temporary, path)`. The temporary name is gone afterwards, whatever happened."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        publish(tmp, path)
        fsync_path(path.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


@contextlib.contextmanager
def atomic_open(path: Path) -> Iterator[IO[bytes]]:
    """Write `path` through a temporary file that replaces it only when the block succeeds.

    Readers see the old content or the new, never a part; on error the old file is untouched.
    """
    with _staged(Path(path), os.replace) as fh:
        yield fh


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with atomic_open(path) as fh:
        fh.write(data)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def publish_once(path: Path, data: bytes) -> None:
    """Create `path` holding `data` unless it exists already; never replace it.

    For a file several processes may create at once (every rank writes the same cache header):
    the complete temporary file is hard-linked to `path`, which fails when the name exists, so
    the first writer wins and the others leave it as it is. The caller reads `path` back to see
    what won.
    """
    with _staged(Path(path), _link_unless_present) as fh:
        fh.write(data)


def _link_unless_present(tmp: str, path: Path) -> None:
    try:
        os.link(tmp, path)
    except FileExistsError:
        pass  # another writer created it first; the caller compares against theirs
    except OSError:
        # A filesystem without hard links: an atomic replace, still safe when the racing
        # writers agree, which the caller's read-back then verifies.
        os.replace(tmp, path)


def write_durably(path: Path, write: Callable[[IO[bytes]], object]) -> None:
    """Create `path` (which must not exist), let `write` fill it, and fsync it.

    No rename: for files inside a staging folder that is itself renamed into place once
    complete (`cnet_data.outdir`), where each file needs only to be durable.
    """
    with open(path, "xb") as fh:
        write(fh)
        fh.flush()
        os.fsync(fh.fileno())
