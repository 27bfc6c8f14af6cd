"""The control gain at every validation: logged, printed, and kept for the loss curve.

Measured every `validation.every_n_steps` steps and at the end of training when a validation
happens then (validation prompts set, or periodic validation on), on every rank (the
measurement is collective). Rank 0 logs `val/control_gain`, `val/loss_true_condition` and
`val/loss_shuffled_condition` to the trainer's loggers, prints one line, and appends the point
to `control_gain.csv` at once (fsynced). A relaunch drops the points past its resume step first,
as `loss.csv` does, and measures them again: the file holds every measured step once.
"""

from __future__ import annotations

from typing import Any

import lightning as L
from typing_extensions import override

from cnet_train.callbacks.base import AfterBatch
from cnet_train.callbacks.history import CONTROL_GAIN_CSV, StepTable
from cnet_train.config import TrainConfig
from cnet_train.control_gain import (
    ControlGain,
    check_held_out_cached,
    format_gain_line,
    held_out_batches,
    measure_control_gain,
)
from cnet_train.module import ControlNetModule


class ControlGainCallback(AfterBatch):
    def __init__(self, config: TrainConfig) -> None:
        self.config = config
        self.points: list[tuple[int, ControlGain]] = []
        """The measurements of this process's run, in order (on every rank)."""
        self.last_step: int | None = None
        """The step of the newest measurement (the same on every rank)."""

    @property
    def table(self) -> StepTable:
        return StepTable(self.config.run_dir / CONTROL_GAIN_CSV, 3)

    @property
    def enabled(self) -> bool:
        return self.config.control_gain.enabled

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.enabled:
            return
        validation = self.config.validation
        cache = pl_module.cache if isinstance(pl_module, ControlNetModule) else None
        # Found now, not by a KeyError at the end of the run (every rank sees the same cache).
        if cache is not None and (validation.prompts or validation.every_n_steps):
            check_held_out_cached(self.config, cache)
        if trainer.is_global_zero:
            self.table.truncate_after(trainer.global_step)

    @override
    def after_batch(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any
    ) -> None:
        every, step = self.config.validation.every_n_steps, trainer.global_step
        # With accumulation, several batches end at one optimizer step: measure once.
        if self.enabled and every and step and step % every == 0 and step != self.last_step:
            self.measure(trainer, pl_module)

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        validation, step = self.config.validation, trainer.global_step
        if not self.enabled or self.last_step == step:
            return
        if not (validation.prompts or validation.every_n_steps):
            return
        # A relaunch after a kill at the end finds the point already measured; rank 0's view
        # decides for all ranks, since the measurement is collective.
        done = step in {s for s, _ in self.table.rows()} if trainer.is_global_zero else False
        if trainer.strategy.broadcast(done, src=0):
            self.last_step = step
            return
        self.measure(trainer, pl_module)

    def measure(self, trainer: L.Trainer, pl_module: L.LightningModule) -> ControlGain | None:
        """Measure now (collective); rank 0 logs, prints and records the point."""
        if not isinstance(pl_module, ControlNetModule):
            return None
        settings, step = self.config.control_gain, trainer.global_step
        gain = measure_control_gain(
            pl_module,
            held_out_batches(self.config),
            seed=self.config.validation.seed,
            repeats=settings.repeats,
            timestep_ranges=settings.timestep_ranges,
        )
        self.last_step = step
        self.points.append((step, gain))
        if trainer.is_global_zero:
            self.table.append([(step, (gain.gain, gain.true_loss, gain.shuffled_loss))])
            metrics = {
                "val/control_gain": gain.gain,
                "val/loss_true_condition": gain.true_loss,
                "val/loss_shuffled_condition": gain.shuffled_loss,
            }
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)
            _print(trainer, format_gain_line(step, gain))
        return gain


def _print(trainer: L.Trainer, line: str) -> None:
    """Through the progress bar when there is one, which would otherwise tear the line."""
    bar = trainer.progress_bar_callback
    if bar is not None:
        bar.print(line)
    else:
        print(line)
