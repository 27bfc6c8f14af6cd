"""Durable commits in the run directory: write under a temporary name, fsync, rename, fsync
the folder.

Everything a run keeps (checkpoints, exports) is written beside its final name, never in
`$TMPDIR`: a rename within one filesystem is atomic, a move across filesystems is a copy that a
kill leaves torn under the final name. The fsyncs make the committed name survive a power loss
or a node crash, not only a killed process. The fsync and rename primitives are cnet-data's
(`cnet_data.atomic`, the one writer below cnet-train); this module adds the run directory's
naming of temporary writes, their cleanup, and the error of a failed write.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from cnet_data.atomic import fsync_tree, rename_durably
from cnet_train.errors import WriteFailedError

PARTIAL_SUFFIX = ".partial"


def partial_path(final: Path) -> Path:
    """The temporary name `final` is written under: hidden, beside it, the same on every rank
    (ranks that write parts of one checkpoint folder must agree on it without talking)."""
    return final.with_name(f".{final.name}{PARTIAL_SUFFIX}")


def is_partial(path: Path) -> bool:
    return path.name.startswith(".") and path.name.endswith(PARTIAL_SUFFIX)


def commit(partial: Path, final: Path) -> None:
    """Make the complete `partial` (file or folder) durable and rename it to `final`.

    A folder cannot replace a non-empty folder in one rename, so an existing `final` folder
    (a torn one from an older version) is removed first; a file is replaced atomically."""
    fsync_tree(partial)
    if final.is_dir() and not final.is_symlink():
        shutil.rmtree(final)
    rename_durably(partial, final)


def remove(path: Path) -> None:
    """Delete a file or folder cnet wrote; gone already is fine."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def remove_partials(folder: Path, prefix: str) -> list[Path]:
    """Delete the temporary writes of a killed run in `folder` (only names cnet gives them)."""
    if not folder.is_dir():
        return []
    stale = [p for p in folder.iterdir() if is_partial(p) and p.name[1:].startswith(prefix)]
    for path in stale:
        remove(path)
    return stale


def free_space(path: Path) -> str:
    """Free space on the filesystem holding `path`, for error messages."""
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        free = shutil.disk_usage(probe).free
    except OSError:
        return "unknown free space"
    return f"{free / 2**30:.2f} GiB free"


def write_failed(what: str, final: Path, exc: OSError, *, hint: str) -> WriteFailedError:
    """The error of a failed write of `what` (e.g. "checkpoint") to `final`, naming the path,
    the OS's reason and the free space left; the previous committed ones are kept."""
    return WriteFailedError(
        f"could not write the {what} {final} ({exc.strerror or exc}; "
        f"{free_space(final.parent)}); the previous {what}s are kept",
        hint=hint,
    )
