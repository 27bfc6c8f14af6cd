"""The one error path of cnet's console scripts: a one-line message and a hint for every
error cnet can name, the traceback only with `--debug`.

Lives in cnet-data because every cnet package depends on it and it imports nothing heavy.
"""

from __future__ import annotations

import errno
import sys
import traceback
from collections.abc import Callable


class CnetError(Exception):
    """An error cnet can explain: `str(error)` says what is wrong and names the thing,
    `hint` says what to do about it, `exit_code` is what the console script returns."""

    exit_code = 1

    def __init__(self, message: str, *, hint: str = "") -> None:
        super().__init__(message)
        self.hint = hint


def run_reporting(prog: str, run: Callable[[], int], *, debug: bool = False) -> int:
    """Run a command; report a failure as `PROG: error: MESSAGE` (and `hint: ...`) on stderr.

    With `debug` the traceback is printed too. Exit codes: the error's `exit_code` for a
    `CnetError`, 2 for bad input (`ValueError`, a missing file), 1 for other OS errors, 130
    for Ctrl-C, 1 for anything unexpected (which always asks to be rerun with `--debug`).
    """
    try:
        return run()
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # every failure ends here, named
        message, hint, code = describe(exc)
        if debug:
            traceback.print_exc()
        print(f"{prog}: error: {message}", file=sys.stderr)
        if hint:
            print(f"{prog}: hint: {hint}", file=sys.stderr)
        return code


def describe(exc: BaseException) -> tuple[str, str, int]:
    """(message, hint, exit code) for an exception raised by a cnet command."""
    if isinstance(exc, CnetError):
        return str(exc), exc.hint, exc.exit_code
    if isinstance(exc, (FileNotFoundError, ValueError)):
        return str(exc), "", 2
    if isinstance(exc, OSError):
        hint = ""
        if exc.errno == errno.ENOSPC:
            hint = "free space on that disk (or point run_dir elsewhere) and run again"
        elif exc.errno in (errno.EACCES, errno.EROFS, errno.EPERM):
            hint = "the path is not writable by this user; choose a folder you can write"
        return str(exc), hint, 1
    where = traceback.extract_tb(exc.__traceback__)[-1:] if exc.__traceback__ else []
    at = f" at {where[0].filename}:{where[0].lineno}" if where else ""
    return (
        f"unexpected {type(exc).__name__}: {exc}{at}",
        "rerun with --debug for the traceback, and report it if the input looks right",
        1,
    )
