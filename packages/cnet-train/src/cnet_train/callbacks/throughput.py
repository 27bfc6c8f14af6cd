"""Samples per second, logged every few steps."""

from __future__ import annotations

import time
from typing import Any

import lightning as L
from typing_extensions import override

from cnet_train.callbacks.base import AfterBatch


class ThroughputLogger(AfterBatch):
    """Logs `train/samples_per_s` (all ranks together) over each logging window."""

    def __init__(self, every_n_steps: int) -> None:
        self.every_n_steps = every_n_steps
        self._samples = 0
        self._start: float | None = None

    @override
    def after_batch(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any
    ) -> None:
        now = time.perf_counter()
        if self._start is None:  # the first batch includes start-up: measure from its end
            self._start = now
            return
        self._samples += int(batch["image"].shape[0]) * trainer.world_size
        if trainer.global_step % self.every_n_steps == 0 and now > self._start:
            rate = self._samples / (now - self._start)
            pl_module.log("train/samples_per_s", rate, rank_zero_only=True)
            self._samples, self._start = 0, now
