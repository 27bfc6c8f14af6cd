"""Full training checkpoints: written durably in the run directory, pruned only after the next
one is committed, and taken at a preemption signal.

A checkpoint `RUN_DIR/checkpoints/step-00000500.ckpt` is a file (single device, DDP) or a
folder (DeepSpeed, FSDP2's distributed checkpoint). Every rank writes its part under the hidden
temporary name `.step-00000500.ckpt.partial`; rank 0 then fsyncs it, renames it to its final
name and fsyncs the folder. A name without the temporary mark is therefore complete, and a kill
at any moment leaves the previous checkpoints as they were (the partial is deleted at the next
start). Older checkpoints beyond `keep_last` are deleted only after a new one is committed, by
listing the folder, so a resumed run prunes what earlier runs wrote too.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from typing_extensions import override

from cnet_train import durable
from cnet_train.callbacks.base import AfterBatch
from cnet_train.callbacks.guard import NonFiniteGuard
from cnet_train.config import CheckpointConfig
from cnet_train.errors import PreemptedError
from cnet_train.preemption import REQUEUE_SIGNAL, StopSignals, requeue_slurm_job
from cnet_train.resume import checkpoint_name, committed_checkpoints

logger = logging.getLogger(__name__)


class DurableCheckpointIO(TorchCheckpointIO):
    """`torch.save` straight to the given (temporary) path, then fsync.

    Lightning's own writer stages the file with fsspec in `$TMPDIR` and moves it: a copy when
    `$TMPDIR` is another filesystem (torn under the final name by a kill), a leak when killed
    before the move, and a failure when `$TMPDIR` is smaller than a checkpoint."""

    @override
    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("wb") as fh:
            torch.save(checkpoint, fh)
            fh.flush()
            os.fsync(fh.fileno())


class CheckpointCallback(AfterBatch):
    """Checkpoints every `every_n_steps` optimizer steps, at the end, and when preempted;
    with `guard`, only after the guard agrees that nothing is non-finite."""

    def __init__(
        self, directory: Path, config: CheckpointConfig, *, guard: NonFiniteGuard | None = None
    ) -> None:
        self.directory = directory
        self.config = config
        self.guard = guard
        self.signals = StopSignals()
        self.saved_step: int | None = None
        self._seen_step = 0

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if trainer.is_global_zero:
            for stale in durable.remove_partials(self.directory, "step-"):
                logger.info("removed %s, left by a run killed while writing it", stale)

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._seen_step = trainer.global_step
        self.signals.install(trainer)

    @override
    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.signals.uninstall()

    @override
    def after_batch(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any
    ) -> None:
        step = trainer.global_step
        if step == self._seen_step:  # inside gradient accumulation: not a step boundary
            return
        self._seen_step = step
        stop = self.signals.agreed(trainer)
        every = self.config.every_n_steps
        if stop is not None or (every and step % every == 0):
            self.save(trainer, pl_module)
        if stop is not None:
            self._stop(trainer, stop)

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.save(trainer, pl_module)  # the end is always checkpointed (a no-op if it was)

    def save(self, trainer: L.Trainer, pl_module: L.LightningModule) -> Path:
        """Commit the checkpoint of the current step (every rank calls this)."""
        step = trainer.global_step
        final = self.directory / checkpoint_name(step)
        if self.saved_step == step or _rank_zero_sees(trainer, final):
            self.saved_step = step
            return final
        if self.guard is not None:
            self.guard.check(trainer, pl_module, f"the checkpoint of step {step}")
        partial = durable.partial_path(final)
        if trainer.is_global_zero:
            durable.remove(partial)
            self.directory.mkdir(parents=True, exist_ok=True)
        trainer.strategy.barrier("cnet-checkpoint-begin")
        try:
            trainer.save_checkpoint(partial)  # the full state: optimizer, loops, callbacks
            if trainer.is_global_zero:
                durable.commit(partial, final)
        except OSError as exc:
            if trainer.is_global_zero:
                durable.remove(partial)
            raise durable.write_failed(
                "checkpoint",
                final,
                exc,
                hint="free space there (or set run_dir elsewhere) and relaunch to resume",
            ) from exc
        trainer.strategy.barrier("cnet-checkpoint-commit")
        self.saved_step = step
        if trainer.is_global_zero:
            self._prune()
        return final

    def _prune(self) -> None:
        for old in committed_checkpoints(self.directory)[: -self.config.keep_last]:
            durable.remove(old)

    def _stop(self, trainer: L.Trainer, signum: int) -> None:
        import signal

        name = signal.Signals(signum).name
        step = trainer.global_step
        done = (
            f"stopped by {name} at step {step}; checkpoint {self.directory / checkpoint_name(step)}"
        )
        if signum == REQUEUE_SIGNAL and trainer.is_global_zero:
            requeued = requeue_slurm_job()
            if requeued:
                done += f"; {requeued}"
        raise PreemptedError(done, signum)


def _rank_zero_sees(trainer: L.Trainer, path: Path) -> bool:
    """Whether rank 0 sees `path` (the same answer on every rank: they must decide together)."""
    exists = path.exists() if trainer.is_global_zero else False
    return bool(trainer.strategy.broadcast(exists, src=0))
