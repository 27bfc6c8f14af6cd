"""Stop every rank, with a clear message, when the loss stops being finite."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from typing_extensions import override

from cnet_train.callbacks.base import AfterBatch


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite."""


class NonFiniteGuard(AfterBatch):
    """Checks the loss every `every_n_steps` optimizer steps.

    Not every step: the check reads the loss on the host and agrees on it across ranks, a sync
    the training step otherwise avoids. A NaN does not heal, so a later check still sees it.
    """

    def __init__(self, every_n_steps: int) -> None:
        self.every_n_steps = every_n_steps

    @override
    def after_batch(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any
    ) -> None:
        if trainer.global_step % self.every_n_steps:
            return
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        finite = bool(torch.isfinite(loss).all()) if isinstance(loss, torch.Tensor) else True
        # All ranks decide together, so none is left waiting in a collective.
        all_finite = trainer.strategy.reduce_boolean_decision(finite, all=True)
        if not all_finite:
            raise NonFiniteLossError(
                f"the training loss is not finite at step {trainer.global_step} (on at least one "
                "rank); lower optimizer.lr, enable gradient clipping, check the data, or use "
                "bf16-mixed instead of 16-mixed. The last complete checkpoint is kept."
            )
