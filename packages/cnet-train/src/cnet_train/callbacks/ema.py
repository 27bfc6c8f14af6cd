"""The EMA of the ControlNet as a Lightning callback: updated after each optimizer step,
saved in and restored from the checkpoint."""

from __future__ import annotations

from typing import Any

import lightning as L
from typing_extensions import override

from cnet_models.ema import EMAConfig, ExponentialMovingAverage
from cnet_train.callbacks.base import AfterBatch
from cnet_train.module import ControlNetModule


class EMACallback(AfterBatch):
    """Keeps `ema` (an `ExponentialMovingAverage` of the module's ControlNet) up to date."""

    def __init__(self, config: EMAConfig) -> None:
        self.config = config
        self.ema: ExponentialMovingAverage | None = None
        self._pending: dict[str, Any] | None = None

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        module = _module(pl_module)
        # Made here, not earlier: the weights are on their device and possibly sharded now.
        self.ema = ExponentialMovingAverage(module.controlnet, self.config)
        if self._pending is not None:
            self.ema.load_state_dict(self._pending)
            self._pending = None

    @override
    def after_batch(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any
    ) -> None:
        if self.ema is not None:
            # global_step counts optimizer steps; with gradient accumulation it stays put on
            # batches without a step, and the EMA ignores a step it has already seen.
            self.ema.update(_module(pl_module).controlnet, trainer.global_step)

    @override
    def state_dict(self) -> dict[str, Any]:
        if self.ema is None:
            return {}
        # Under ZeRO-3 every rank writes its own checkpoint file: each stores its own part.
        if self.ema.is_partitioned():
            return self.ema.partition_state_dict()
        return self.ema.full_state_dict()

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        if self.ema is None:
            self._pending = state_dict
        else:
            self.ema.load_state_dict(state_dict)


def _module(pl_module: L.LightningModule) -> ControlNetModule:
    if not isinstance(pl_module, ControlNetModule):
        raise TypeError(f"EMACallback needs a ControlNetModule, got {type(pl_module).__name__}")
    return pl_module
