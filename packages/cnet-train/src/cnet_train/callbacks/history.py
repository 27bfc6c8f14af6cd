"""The loss per optimizer step, kept as CSV and drawn as a PNG curve at the end (rank 0).

`loss.csv` follows the checkpoints: the rows since the last write are appended (and fsynced)
whenever a checkpoint is saved and at the end. A relaunch resumes from a checkpoint and first
drops the rows past its step (written by the killed run after that checkpoint, and trained
again now), so the file holds every step once, across any number of relaunches.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning as L
import torch
from typing_extensions import override

from cnet_data.atomic import atomic_write_text
from cnet_train.callbacks.base import AfterBatch
from cnet_train.plots import write_line_chart


class LossHistory(AfterBatch):
    """Records (step, loss) every `every_n_steps` steps; writes `loss.csv` and `loss.png`."""

    def __init__(self, run_dir: Path, every_n_steps: int = 1) -> None:
        self.run_dir = run_dir
        self.every_n_steps = every_n_steps
        self.steps: list[int] = []
        self.losses: list[float] = []
        self._written = 0
        """How many of `steps` are in loss.csv already."""

    @property
    def csv(self) -> Path:
        return self.run_dir / "loss.csv"

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            self._truncate_after(trainer.global_step)

    @override
    def after_batch(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any
    ) -> None:
        step = trainer.global_step
        if not trainer.is_global_zero or step % self.every_n_steps or step in self.steps[-1:]:
            return
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if isinstance(loss, torch.Tensor):
            self.steps.append(step)
            self.losses.append(float(loss.detach()))

    @override
    def on_save_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if trainer.is_global_zero:
            self._append_new_rows()

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        self._append_new_rows()
        rows = self._rows()
        if rows:
            write_line_chart(
                [s for s, _ in rows],
                [v for _, v in rows],
                self.run_dir / "loss.png",
                title="training loss",
            )

    def curve(self) -> list[tuple[int, float]]:
        return list(zip(self.steps, self.losses, strict=True))

    def _append_new_rows(self) -> None:
        new = zip(self.steps[self._written :], self.losses[self._written :], strict=True)
        lines = [f"{s},{v:.6g}\n" for s, v in new]
        if not lines:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with self.csv.open("a", encoding="utf-8") as fh:
            fh.writelines(lines)
            fh.flush()
            os.fsync(fh.fileno())
        self._written = len(self.steps)

    def _rows(self) -> list[tuple[int, float]]:
        if not self.csv.is_file():
            return []
        rows = []
        for line in self.csv.read_text(encoding="utf-8").splitlines():
            step, _, value = line.partition(",")
            try:
                rows.append((int(step), float(value)))
            except ValueError:
                continue  # a line torn by a kill in the middle of an append
        return rows

    def _truncate_after(self, step: int) -> None:
        rows = self._rows()
        kept = [(s, v) for s, v in rows if s <= step]
        if len(kept) != len(rows) or (self.csv.is_file() and not _ends_in_newline(self.csv)):
            atomic_write_text(self.csv, "".join(f"{s},{v:.6g}\n" for s, v in kept))


def _ends_in_newline(path: Path) -> bool:
    data = path.read_bytes()
    return not data or data.endswith(b"\n")
