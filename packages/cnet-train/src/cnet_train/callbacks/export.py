"""Diffusers-format exports of the ControlNet and its EMA twin, every N steps and at the end.

Each export is a folder `RUN_DIR/exports/step-00001000/` holding `controlnet/` and, with EMA,
`controlnet_ema/`, each loadable by `ControlNetModel.from_pretrained`. An export is written
under a temporary name and renamed when complete; only then are exports beyond the newest
`keep_last` deleted.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import lightning as L
from typing_extensions import override

from cnet_models.ema_export import export_controlnet, export_ema_controlnet
from cnet_train.callbacks.base import AfterBatch
from cnet_train.callbacks.ema import EMACallback
from cnet_train.config import ExportConfig
from cnet_train.module import ControlNetModule

EXPORT_PREFIX = "step-"


def export_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "exports" / f"{EXPORT_PREFIX}{step:08d}"


class ExportCallback(AfterBatch):
    def __init__(self, run_dir: Path, config: ExportConfig) -> None:
        self.run_dir = run_dir
        self.config = config
        self.last: Path | None = None
        """The newest complete export."""

    @override
    def after_batch(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any
    ) -> None:
        every = self.config.every_n_steps
        step = trainer.global_step
        if every and step and step % every == 0 and not self._exported(step):
            self.export(trainer, pl_module)

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._exported(trainer.global_step):
            self.export(trainer, pl_module)

    def _exported(self, step: int) -> bool:
        return self.last is not None and self.last == export_dir(self.run_dir, step)

    def export(self, trainer: L.Trainer, pl_module: L.LightningModule) -> Path:
        """Write the export of the current step (every rank calls this; rank 0 writes)."""
        if not isinstance(pl_module, ControlNetModule):
            raise TypeError(f"ExportCallback needs a ControlNetModule, got {type(pl_module)}")
        out = export_dir(self.run_dir, trainer.global_step)
        ema = next((c.ema for c in trainer.callbacks if isinstance(c, EMACallback)), None)  # type: ignore[attr-defined]
        # Both gather full tensors when the weights are sharded: every rank takes part.
        export_controlnet(pl_module.controlnet, out / "controlnet")
        if ema is not None:
            export_ema_controlnet(ema, pl_module.controlnet, out / "controlnet_ema")
        if trainer.is_global_zero:
            self._prune()
        trainer.strategy.barrier("cnet-export")
        self.last = out
        return out

    def _prune(self) -> None:
        exports = sorted((self.run_dir / "exports").glob(f"{EXPORT_PREFIX}*"))
        for old in exports[: -self.config.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
