"""The errors a training run ends with, each a `CnetError`: one line, a hint, an exit code."""

from __future__ import annotations

from cnet_data.errors import CnetError

__all__ = [
    "CnetError",
    "NonFiniteLossError",
    "PreemptedError",
    "RankFailedError",
    "ResumeMismatchError",
    "WriteFailedError",
]


class NonFiniteLossError(CnetError):
    """The training loss or the ControlNet's weights became NaN or infinite."""

    def __init__(self, message: str) -> None:
        super().__init__(
            message,
            hint="lower optimizer.lr, keep trainer.gradient_clip_val set, check the data, or use "
            "bf16-mixed instead of 16-mixed; a relaunch resumes from the last finite checkpoint",
        )


class RankFailedError(CnetError):
    """Another process of this launch exited with an error."""


class PreemptedError(CnetError):
    """The run was asked to stop (SIGTERM, SIGUSR1) and stopped after checkpointing.

    The exit code is 128 + the signal number, what a shell reports for a process the signal
    ended: schedulers and wrapper scripts read it as "terminated", not as success."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message, hint="relaunch the same command to resume from the checkpoint")
        self.signum = signum
        self.exit_code = 128 + signum


class WriteFailedError(CnetError):
    """A checkpoint or export could not be written; the previous committed one is kept."""


class ResumeMismatchError(CnetError):
    """The ranks of one job do not see the same checkpoint to resume from."""


class CacheIncompleteError(CnetError):
    """The embedding cache lacks captions the run will read from it."""
