"""Writing output folders safely: only into what cnet owns, staged beside, renamed into place.

A mistyped `--out` must never cost the user a file. So an output folder is written only where
nothing is, into an empty folder, or over an earlier output of the same kind, which is
recognised by its marker (the caller's `is_ours`) and holds nothing but the file names the
caller owns. Anything else at the path (a folder of other files, a file, a symbolic link) is
refused with an `OutputPathError` before any work is done.

The new folder is staged in a hidden sibling named `.NAME.cnet-staging.HOST.PID.TOKEN`, made
durable (every file and the folder fsynced), then renamed over the target: in one atomic step
where Linux can exchange two paths, otherwise with a short window in which a crash leaves only
the old output aside as `.NAME.cnet-old.HOST.PID.TOKEN`. Leftovers under those two patterns,
whose process on this host is gone, are cleaned by the next write of the same target; nothing
else is ever removed, and removing means unlinking the owned file names and the emptied folder.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import secrets
import socket
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import attrs

from cnet_data.atomic import fsync_path
from cnet_data.errors import CnetError

logger = logging.getLogger(__name__)

TargetState = Literal["absent", "empty", "ours"]
_STAGING = "cnet-staging"
_RETIRED = "cnet-old"
_SHOWN_ENTRIES = 5
_HINT = (
    "choose another output folder (--out, or data.index in a training config), "
    "or move or remove what is there yourself"
)


@attrs.frozen
class Ownership:
    """How to recognise an output of one kind, and the only file names it may hold."""

    what: str
    """What the output is, for messages: `a cnet-data index`."""
    owned: frozenset[str]
    """Every file name such an output holds; removing one removes these and nothing else."""
    is_ours: Callable[[Path], bool]
    """Whether a path carries the output's marker."""


class OutputPathError(CnetError):
    """Something that cnet did not write is where an output should go; nothing was touched."""

    exit_code = 2

    def __init__(self, message: str, *, hint: str = _HINT) -> None:
        super().__init__(message, hint=hint)


def claim_directory(target: Path, kind: Ownership) -> TargetState:
    """What is at `target`, or `OutputPathError` if writing `kind` there could lose a file."""
    what = kind.what
    if target.is_symlink():
        raise OutputPathError(
            f"{target} is a symbolic link (to {os.readlink(target)}); cnet-data writes {what} "
            "only into a real folder, so that it never replaces what a link points at"
        )
    try:
        mode = os.lstat(target).st_mode
    except FileNotFoundError:
        return "absent"
    if not stat.S_ISDIR(mode):
        raise OutputPathError(f"{target} is {_kind(mode)}, not {what}; it was left as it is")
    entries = sorted(os.listdir(target))
    if not entries:
        return "empty"
    if not kind.is_ours(target):
        raise OutputPathError(
            f"{target} is a folder that is not {what} (it holds {_listing(entries)}); "
            "cnet-data writes only into a new or empty folder, or over its own earlier output"
        )
    foreign = [name for name in entries if name not in kind.owned or not _is_file(target / name)]
    if foreign:
        raise OutputPathError(
            f"{target} is {what} but also holds what cnet-data did not write "
            f"({_listing(foreign)}); replacing the old {what} would lose it",
            hint="move those out of the folder, or choose another output folder",
        )
    return "ours"


def claim_file(path: Path, *, is_ours: Callable[[Path], bool], what: str) -> None:
    """Refuse to replace anything at `path` but an earlier `what` (recognised by `is_ours`)."""
    if path.is_symlink():
        raise OutputPathError(f"{path} is a symbolic link; cnet-data does not write {what} there")
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISREG(mode):
        raise OutputPathError(f"{path} is {_kind(mode)}, not {what}; it was left as it is")
    if not is_ours(path):
        raise OutputPathError(
            f"{path} exists and is not {what}; cnet-data replaces only its own {what}",
            hint="choose another path (--report) or move that file yourself",
        )


def new_staging(target: Path) -> Path:
    """A fresh hidden sibling of `target` to build the new output in (mode from the umask)."""
    while True:
        staging = _sibling(target, _STAGING)
        try:
            staging.mkdir()
        except FileExistsError:
            continue
        return staging


def clean_stale(target: Path, kind: Ownership) -> None:
    """Remove staging and retired folders of `target` left by killed writers on this host."""
    for folder in _leftovers(target):
        logger.info("removing %s, left by an interrupted write of %s", folder, target)
        remove_owned(folder, kind)


def commit_directory(staging: Path, target: Path, kind: Ownership) -> None:
    """Put the complete `staging` folder at `target`; an old output there goes only after."""
    fsync_path(staging)
    state = claim_directory(target, kind)
    if state != "ours":
        # rename(2) replaces nothing or an empty folder, and fails if a file or a non-empty
        # folder appeared meanwhile, so nothing can be lost here.
        os.rename(staging, target)
    elif _exchange(staging, target):
        remove_owned(staging, kind)  # now the old output
    else:
        _replace_in_two_steps(staging, target, kind)
    fsync_path(target.parent)


def _replace_in_two_steps(staging: Path, target: Path, kind: Ownership) -> None:
    """Move the old output aside, the new one in; put the old one back if the second fails."""
    retired = _sibling(target, _RETIRED)
    os.rename(target, retired)
    try:
        os.rename(staging, target)
    except BaseException:
        os.rename(retired, target)
        raise
    remove_owned(retired, kind)


def remove_owned(folder: Path, kind: Ownership) -> bool:
    """Unlink the owned file names in `folder`, then the folder if that emptied it.

    Never a recursive delete: a file cnet did not write keeps the folder, with a warning.
    """
    for name in kind.owned:
        try:
            (folder / name).unlink()
        except FileNotFoundError:
            continue
        except OSError as exc:  # e.g. a folder of that name: not ours, so it stays
            logger.warning("left %s in place: %s", folder / name, exc.strerror)
    try:
        folder.rmdir()
    except FileNotFoundError:
        return True
    except OSError as exc:
        logger.warning("left %s in place: %s", folder, exc.strerror)
        return False
    return True


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux `renameat2` with `RENAME_EXCHANGE`).

    False where the platform or filesystem cannot, so the caller falls back to two renames.
    """
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError, TypeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p]
    renameat2.argtypes += [ctypes.c_uint]
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def _sibling(target: Path, role: str) -> Path:
    token = secrets.token_hex(4)
    return target.with_name(f".{target.name}.{role}.{socket.gethostname()}.{os.getpid()}.{token}")


def _leftovers(target: Path) -> list[Path]:
    """Staging and retired siblings of `target` whose writer on this host has exited."""
    host = socket.gethostname()
    prefixes = tuple(f".{target.name}.{role}." for role in (_STAGING, _RETIRED))
    found = []
    for name in sorted(os.listdir(target.parent)):
        prefix = next((p for p in prefixes if name.startswith(p)), None)
        if prefix is None:
            continue
        owner, _, pid = name[len(prefix) :].rpartition(".")[0].rpartition(".")
        entry = target.parent / name
        if owner != host or not pid.isdigit() or _alive(int(pid)):
            continue
        if stat.S_ISDIR(os.lstat(entry).st_mode):
            found.append(entry)
    return found


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _is_file(path: Path) -> bool:
    return stat.S_ISREG(os.lstat(path).st_mode)


def _kind(mode: int) -> str:
    if stat.S_ISREG(mode):
        return "a file"
    if stat.S_ISFIFO(mode):
        return "a named pipe"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "a device or other special file"


def _listing(names: list[str]) -> str:
    shown = ", ".join(names[:_SHOWN_ENTRIES])
    more = len(names) - _SHOWN_ENTRIES
    return f"{len(names)} entr{'y' if len(names) == 1 else 'ies'}: {shown}" + (
        f" and {more} more" if more > 0 else ""
    )
