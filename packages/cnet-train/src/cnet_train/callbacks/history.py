"""The loss per optimizer step, kept as CSV and drawn as a PNG curve at the end (rank 0).

`loss.csv` follows the checkpoints: the rows since the last write are appended (and fsynced)
whenever a checkpoint is saved and at the end. A relaunch resumes from a checkpoint and first
drops the rows past its step (written by the killed run after that checkpoint, and trained
again now), so the file holds every step once, across any number of relaunches.

`loss.png` shows the training loss and, below it on the same step axis, the control gain
measured at the validations (`control_gain.csv`, written by the control-gain callback with the
same truncate-on-resume rule, through `StepTable`).

The losses stay on the device, detached, until a logging step (or a checkpoint, or the end)
reads them all at once: reading one every step would make the host wait for the GPU at every
step.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from typing_extensions import override

from cnet_data.atomic import atomic_write_text
from cnet_train.callbacks.base import AfterBatch
from cnet_train.plots import Series, write_panels

CONTROL_GAIN_CSV = "control_gain.csv"
"""Columns: step, gain, loss with the own condition, loss with a shuffled one."""

Row = tuple[int, tuple[float, ...]]


class StepTable:
    """A CSV of rows `step,value[,value...]` that survives kills and relaunches: appends are
    fsynced, a torn last line is ignored on reading, and `truncate_after` drops the rows past a
    resume step."""

    def __init__(self, path: Path, columns: int) -> None:
        self.path = path
        self.columns = columns
        """Values per row, after the step."""

    def rows(self) -> list[Row]:
        if not self.path.is_file():
            return []
        rows = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            step, *values = line.split(",")
            try:
                row = (int(step), tuple(float(v) for v in values))
            except ValueError:
                continue  # a line torn by a kill in the middle of an append
            if len(row[1]) == self.columns:
                rows.append(row)
        return rows

    def append(self, rows: Sequence[Row]) -> None:
        if not rows:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as fh:
            fh.writelines(_line(row) for row in rows)
            fh.flush()
            os.fsync(fh.fileno())

    def truncate_after(self, step: int) -> None:
        """Keep the rows up to `step` (and drop a torn last line)."""
        rows = self.rows()
        kept = [row for row in rows if row[0] <= step]
        if len(kept) != len(rows) or (self.path.is_file() and not _ends_in_newline(self.path)):
            atomic_write_text(self.path, "".join(_line(row) for row in kept))


def _line(row: Row) -> str:
    step, values = row
    return ",".join([str(step), *(f"{v:.6g}" for v in values)]) + "\n"


class LossHistory(AfterBatch):
    """Records (step, loss) every `every_n_steps` steps; writes `loss.csv` and `loss.png`."""

    def __init__(self, run_dir: Path, every_n_steps: int = 1, read_every_n_steps: int = 1) -> None:
        self.run_dir = run_dir
        self.every_n_steps = every_n_steps
        self.read_every_n_steps = read_every_n_steps
        """Steps between reads of the recorded losses to the host (the logging interval)."""
        self.steps: list[int] = []
        self._read: list[float] = []
        """The losses of the first `len(_read)` of `steps`, read from the device."""
        self._unread: list[torch.Tensor] = []
        """The detached losses of the steps after those, still where the step left them."""
        self._written = 0
        """How many of `steps` are in loss.csv already."""

    @property
    def csv(self) -> Path:
        return self.run_dir / "loss.csv"

    @property
    def table(self) -> StepTable:
        return StepTable(self.csv, 1)

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            self.table.truncate_after(trainer.global_step)

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
            self._unread.append(loss.detach())
        if step % self.read_every_n_steps == 0:  # the host syncs for the logged scalars then
            self._read_losses()

    @property
    def losses(self) -> list[float]:
        """The loss of each of `steps` (reads those still on the device: a host sync)."""
        self._read_losses()
        return list(self._read)

    def _read_losses(self) -> None:
        if self._unread:  # one copy to the host for all of them
            self._read.extend(torch.stack(self._unread).float().cpu().tolist())
            self._unread = []

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
        draw_loss_png(self.run_dir)

    def curve(self) -> list[tuple[int, float]]:
        return list(zip(self.steps, self.losses, strict=True))

    def _append_new_rows(self) -> None:
        losses = self.losses
        new = zip(self.steps[self._written :], losses[self._written :], strict=True)
        self.table.append([(s, (v,)) for s, v in new])
        self._written = len(self.steps)


def draw_loss_png(run_dir: Path) -> Path | None:
    """`loss.png` from `loss.csv`, with the control gain of `control_gain.csv` in a second
    panel when there is any; None when there is no loss yet."""
    rows = StepTable(run_dir / "loss.csv", 1).rows()
    if not rows:
        return None
    panels = [Series([s for s, _ in rows], [v[0] for _, v in rows], "training loss")]
    gains = StepTable(run_dir / CONTROL_GAIN_CSV, 3).rows()
    if gains:
        panels.append(
            Series(
                [s for s, _ in gains],
                [v[0] for _, v in gains],
                "control gain (loss with a shuffled condition / with the own condition)",
                colour=(220, 110, 20),
                markers=True,
                reference=1.0,
                min_span=0.1,
            )
        )
    path = run_dir / "loss.png"
    write_panels(panels, path)
    return path


def _ends_in_newline(path: Path) -> bool:
    data = path.read_bytes()
    return not data or data.endswith(b"\n")
