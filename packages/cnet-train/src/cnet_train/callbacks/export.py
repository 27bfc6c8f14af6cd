"""Diffusers-format exports of the ControlNet and its EMA twin, every N steps and at the end.

Each export is a folder `RUN_DIR/exports/step-00001000/` holding `controlnet/` and, with EMA,
`controlnet_ema/`, each loadable by `ControlNetModel.from_pretrained`. The whole export is
written under the hidden name `.step-00001000.partial`, fsynced and renamed: a folder with the
final name is complete. Only then are exports beyond the newest `keep_last` deleted. A run
resumed at its last step writes the final export if a kill had prevented it.

The EMA and the non-finite guard are handed over when the callbacks are assembled
(`cnet_train.trainer.build_callbacks`), not looked up among the trainer's callbacks.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
from typing_extensions import override

from cnet_models.ema_export import export_controlnet, export_ema_controlnet
from cnet_models.gather import is_writer
from cnet_train import durable
from cnet_train.callbacks.base import AfterBatch
from cnet_train.callbacks.ema import EMACallback
from cnet_train.callbacks.guard import NonFiniteGuard
from cnet_train.config import ExportConfig
from cnet_train.module import ControlNetModule

logger = logging.getLogger(__name__)

EXPORT_PREFIX = "step-"


def export_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "exports" / f"{EXPORT_PREFIX}{step:08d}"


class ExportCallback(AfterBatch):
    """Exports every `config.every_n_steps` steps and at the end; with `ema`, its twin too;
    with `guard`, only after the guard agrees that nothing is non-finite."""

    def __init__(
        self,
        run_dir: Path,
        config: ExportConfig,
        *,
        ema: EMACallback | None = None,
        guard: NonFiniteGuard | None = None,
    ) -> None:
        self.run_dir = run_dir
        self.config = config
        self.ema = ema
        self.guard = guard
        self.last: Path | None = None
        """The newest complete export."""

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if trainer.is_global_zero:
            for stale in durable.remove_partials(self.run_dir / "exports", EXPORT_PREFIX):
                logger.info("removed %s, left by a run killed while writing it", stale)

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
        step = trainer.global_step
        if self._exported(step):
            return
        out = export_dir(self.run_dir, step)
        # Rank 0's view decides for all: the export is a collective under sharding.
        if trainer.strategy.broadcast(out.is_dir() if trainer.is_global_zero else False, src=0):
            self.last = out  # written before a kill that came after it
            return
        self.export(trainer, pl_module)

    def _exported(self, step: int) -> bool:
        return self.last is not None and self.last == export_dir(self.run_dir, step)

    def export(self, trainer: L.Trainer, pl_module: L.LightningModule) -> Path:
        """Write the export of the current step (every rank calls this; rank 0 writes)."""
        if not isinstance(pl_module, ControlNetModule):
            raise TypeError(f"ExportCallback needs a ControlNetModule, got {type(pl_module)}")
        out = export_dir(self.run_dir, trainer.global_step)
        if self.guard is not None:
            self.guard.check(trainer, pl_module, f"the export of step {trainer.global_step}")
        partial = durable.partial_path(out)
        ema = self.ema.ema if self.ema is not None else None
        try:
            if is_writer():
                durable.remove(partial)
            # Both gather full tensors when the weights are sharded: every rank takes part.
            export_controlnet(pl_module.controlnet, partial / "controlnet")
            if ema is not None:
                export_ema_controlnet(ema, pl_module.controlnet, partial / "controlnet_ema")
            if trainer.is_global_zero:
                durable.commit(partial, out)
        except OSError as exc:
            if trainer.is_global_zero:
                durable.remove(partial)
            raise durable.write_failed(
                "export",
                out,
                exc,
                hint="free space there (or set run_dir elsewhere) and relaunch: the run resumes "
                "from its newest checkpoint and writes the export again",
            ) from exc
        if trainer.is_global_zero:
            self._prune()
        trainer.strategy.barrier("cnet-export")
        self.last = out
        return out

    def _prune(self) -> None:
        exports = sorted(
            p
            for p in (self.run_dir / "exports").glob(f"{EXPORT_PREFIX}*")
            if p.is_dir() and not durable.is_partial(p)
        )
        for old in exports[: -self.config.keep_last]:
            durable.remove(old)
