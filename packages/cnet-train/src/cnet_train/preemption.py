"""Preemption: SIGTERM or SIGUSR1 makes every rank checkpoint at the next step boundary and
stop; under SLURM, SIGUSR1 also requeues the job.

SLURM sends the signal chosen by `#SBATCH --signal=USR1@90` some time before it kills a job,
and SIGTERM just before; torchrun forwards SIGTERM to its workers; Lightning's own launcher
forwards it to the ranks it started (done here too). The signal may reach the ranks during
different steps, so the handler only records it, and at each optimizer step the ranks agree
(any rank's signal counts) before one of them stops: a rank that stopped alone would leave the
others waiting in a collective.

Lightning's own handlers are replaced while training runs: its SIGTERM handling stops each rank
on its own, and its SLURM SIGUSR1 handler saves a checkpoint inside the signal handler, in the
middle of a step, which under a sharded strategy is a collective at a random point.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
from types import FrameType
from typing import Any

import lightning as L

logger = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
REQUEUE_SIGNAL = signal.SIGUSR1


class StopSignals:
    """Records SIGTERM / SIGUSR1 while installed; `agreed` says when all ranks must stop."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}
        self._trainer: L.Trainer | None = None

    def install(self, trainer: L.Trainer) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signals reach only the main thread; nothing to install from elsewhere
        self._trainer = trainer
        for signum in STOP_SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)

    def uninstall(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}
        self._trainer = None

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        first = self.received is None
        self.received = signum
        if first:
            logger.warning(
                "received %s: checkpointing at the next step", signal.Signals(signum).name
            )
            launcher = self._trainer.strategy.launcher if self._trainer is not None else None
            if launcher is not None:
                launcher.kill(signum)  # the local ranks Lightning started get it too

    def agreed(self, trainer: L.Trainer) -> int | None:
        """The signal to stop for if any rank received one, else None (a collective under
        several processes: call on every rank at the same step)."""
        mine = self.received or 0
        if trainer.world_size == 1:
            return mine or None
        import torch
        import torch.distributed as dist

        flag = torch.tensor([mine], device=trainer.strategy.root_device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item()) or None


def requeue_slurm_job() -> str | None:
    """Ask SLURM to requeue this job (what Lightning's SLURM support does on SIGUSR1); returns
    what happened, for the log, or None outside SLURM."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        return None
    array_job, array_task = (
        os.environ.get("SLURM_ARRAY_JOB_ID"),
        os.environ.get("SLURM_ARRAY_TASK_ID"),
    )
    if array_job and array_task:
        job = f"{array_job}_{array_task}"
    try:
        result = subprocess.run(
            ["scontrol", "requeue", job], check=False, capture_output=True, text=True
        )
    except OSError as exc:
        return f"could not requeue SLURM job {job}: {exc}"
    if result.returncode != 0:
        return f"scontrol requeue {job} failed ({result.returncode}): {result.stderr.strip()}"
    return f"requeued SLURM job {job}"
