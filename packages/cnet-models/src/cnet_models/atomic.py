"""Writing a whole folder atomically and durably: fill a hidden sibling, fsync it, rename it in.

cnet-models installs without cnet-data, so it cannot use `cnet_data.atomic`; this is its one
writer (model folders: exports, tiny and demo models). Like cnet-data's, it fsyncs what it
wrote before the rename and the parent folder after, so a completed folder survives a power
loss, not only a killed process.
"""

from __future__ import annotations

import errno
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

__all__ = ["replace_dir_atomically"]

# fsync of a folder fails so on filesystems that cannot sync one (some network and FUSE mounts).
_CANNOT_SYNC_FOLDER = (errno.EINVAL, errno.ENOTSUP, errno.EBADF)


def replace_dir_atomically(out_dir: Path, write: Callable[[Path], None]) -> None:
    """Have `write` fill a fresh sibling folder, then rename it to `out_dir`.

    An existing `out_dir` is moved aside only once the new folder is complete and deleted after
    the new one is in place; if `write` fails, its partial folder is removed and `out_dir` is
    untouched. (A non-empty folder cannot be replaced in one rename, so for an instant between
    the two renames `out_dir` is missing; a failure there puts the old folder back, a crash
    leaves both folders beside it.)
    """
    out_dir = Path(out_dir)
    if out_dir.is_symlink() or (out_dir.exists() and not out_dir.is_dir()):
        raise FileExistsError(f"{out_dir} exists and is not a folder; not replacing it")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{tag}")
    tmp.mkdir()
    try:
        write(tmp)
        _fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = out_dir.with_name(f".{out_dir.name}.old-{tag}") if out_dir.exists() else None
    if old is not None:
        out_dir.rename(old)
    try:
        tmp.rename(out_dir)
    except BaseException:
        if old is not None:
            old.rename(out_dir)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync(out_dir.parent)
    if old is not None:
        shutil.rmtree(old)


def _fsync_tree(folder: Path) -> None:
    """fsync every file and folder under `folder`."""
    for root, _dirs, files in os.walk(folder):
        for name in files:
            _fsync(Path(root) / name)
        _fsync(Path(root))


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as exc:
        if not (exc.errno in _CANNOT_SYNC_FOLDER and path.is_dir()):
            raise
    finally:
        os.close(fd)
