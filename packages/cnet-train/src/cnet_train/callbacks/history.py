"""The loss per optimizer step, kept as CSV and drawn as a PNG curve at the end (rank 0)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from typing_extensions import override

from cnet_train.callbacks.base import AfterBatch
from cnet_train.plots import write_line_chart


class LossHistory(AfterBatch):
    """Appends (step, loss) every `every_n_steps` steps; writes `loss.csv` and `loss.png`."""

    def __init__(self, run_dir: Path, every_n_steps: int = 1) -> None:
        self.run_dir = run_dir
        self.every_n_steps = every_n_steps
        self.steps: list[int] = []
        self.losses: list[float] = []

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
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero or not self.steps:
            return
        csv = self.run_dir / "loss.csv"
        with csv.open("a", encoding="utf-8") as fh:  # a resumed run continues the file
            fh.writelines(f"{s},{v:.6g}\n" for s, v in zip(self.steps, self.losses, strict=True))
        rows = [line.split(",") for line in csv.read_text(encoding="utf-8").splitlines()]
        write_line_chart(
            [int(s) for s, _ in rows],
            [float(v) for _, v in rows],
            self.run_dir / "loss.png",
            title="training loss",
        )

    def curve(self) -> list[tuple[int, float]]:
        return list(zip(self.steps, self.losses, strict=True))
