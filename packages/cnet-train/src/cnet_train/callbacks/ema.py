"""The EMA of the ControlNet as a Lightning callback: updated after each optimizer step,
saved in and restored from the checkpoint under the stable key `cnet.ema`."""

from __future__ import annotations

from typing import Any

import lightning as L
from typing_extensions import override

from cnet_models.ema import EMAConfig, ExponentialMovingAverage
from cnet_train.callbacks.base import AfterBatch
from cnet_train.deferred import DeferredState
from cnet_train.module import ControlNetModule
from cnet_train.state_keys import EMA_STATE_KEY, LEGACY_EMA_KEY, adopt_legacy_state


class EMACallback(AfterBatch):
    """Keeps `ema` (an `ExponentialMovingAverage` of the module's ControlNet) up to date."""

    def __init__(self, config: EMAConfig) -> None:
        self.config = config
        self.ema: ExponentialMovingAverage | None = None
        # Lightning restores callbacks before `on_fit_start`, where the EMA is made.
        self._deferred = DeferredState()

    @property
    @override
    def state_key(self) -> str:
        return EMA_STATE_KEY

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        module = _module(pl_module)
        # Made here, not earlier: the weights are on their device and possibly sharded now.
        self.ema = ExponentialMovingAverage(module.controlnet, self.config)
        self._deferred.release(self.ema.load_state_dict)

    @override
    def after_batch(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any
    ) -> None:
        if self.ema is not None:
            # global_step counts optimizer steps; with gradient accumulation it stays put on
            # batches without a step, and the EMA ignores a step it has already seen.
            self.ema.update(_module(pl_module).controlnet, trainer.global_step)

    @override
    def on_load_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        legacy = checkpoint.get("callbacks", {}).get(LEGACY_EMA_KEY)
        adopt_legacy_state(checkpoint, EMA_STATE_KEY, legacy)

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
        self._deferred.offer(state_dict, self.ema.load_state_dict if self.ema else None)


def _module(pl_module: L.LightningModule) -> ControlNetModule:
    if not isinstance(pl_module, ControlNetModule):
        raise TypeError(f"EMACallback needs a ControlNetModule, got {type(pl_module).__name__}")
    return pl_module
