"""The run's progress through the training data: its epoch and the batches consumed in it.

Owned here, not by the model or the data module: the model no longer reaches for the data
module from its hooks, and the data module only builds the sampler and dataset and saves or
restores their position when asked. The count is of batches the training loop has started: a
loader with workers draws ahead of the loop, so the sampler's own count would be ahead of what
was trained on. Saved under a stable key (`cnet.data_progress`), a resumed run continues with
exactly the batches it had not seen.
"""

from __future__ import annotations

from typing import Any

import lightning as L
from typing_extensions import override

from cnet_train.data import ControlNetDataModule
from cnet_train.deferred import DeferredState, State
from cnet_train.state_keys import DATA_PROGRESS_STATE_KEY, LEGACY_DATA_KEY, adopt_legacy_state


class DataProgress(L.Callback):
    """Starts each epoch of the trainer's `ControlNetDataModule` and counts its batches."""

    def __init__(self) -> None:
        self.epoch = 0
        """The epoch the training loop is in."""
        self.consumed = 0
        """Batches the training loop has started since the current pass over the data began."""
        self._data: ControlNetDataModule | None = None
        self._deferred = DeferredState()

    @property
    @override
    def state_key(self) -> str:
        return DATA_PROGRESS_STATE_KEY

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        data = getattr(trainer, "datamodule", None)
        self._data = data if isinstance(data, ControlNetDataModule) else None

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._deferred.release(self._restore)  # if the data was not built at the restore

    @override
    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._data is None:
            return
        self._data.set_epoch(trainer.current_epoch)
        self.epoch = trainer.current_epoch
        self.consumed = 0

    @override
    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self.consumed += 1

    @override
    def on_load_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        adopt_legacy_state(checkpoint, DATA_PROGRESS_STATE_KEY, checkpoint.get(LEGACY_DATA_KEY))

    @override
    def state_dict(self) -> dict[str, Any]:
        return self._data.position(self.consumed) if self._data is not None else {}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        ready = self._data is not None and self._data.ready
        self._deferred.offer(state_dict, self._restore if ready else None)

    def _restore(self, state: State) -> None:
        if self._data is None:
            raise RuntimeError(
                "DataProgress: the checkpoint holds a place in the data but the trainer has no "
                "ControlNetDataModule to restore it to"
            )
        self.epoch = self._data.restore_position(state)
        self.consumed = 0
