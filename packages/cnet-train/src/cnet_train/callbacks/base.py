"""A callback base for work after each training batch, without Lightning's long signature."""

from __future__ import annotations

from typing import Any

import lightning as L
from typing_extensions import override


class AfterBatch(L.Callback):
    """Subclasses implement `after_batch`; it runs after every training batch on every rank."""

    @override
    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        self.after_batch(trainer, pl_module, outputs, batch)

    def after_batch(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any
    ) -> None:
        raise NotImplementedError
