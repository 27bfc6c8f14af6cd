"""One progress bar for the whole run, in optimizer steps out of `trainer.max_steps`.

Lightning's bars count batches within an epoch (`Epoch 4/-2 ... 2/7`): with `max_epochs=-1`
and a run measured in steps, neither number says how far the run is. This bar counts global
steps from the resume point to `max_steps`, with the rate in steps and in samples per second,
the time left, and the logged loss. It is a `TQDMProgressBar` (tqdm is a dependency of
cnet-train; rich, Lightning's other bar, is not) and is shown on rank 0 only. Lines printed
through `cnet_train.summary.say` appear above it without tearing it.

The loss shown is read on logging steps (and the last) only: reading the logged tensor is a
copy from the device that makes the host wait for the GPU, which the other steps must not do.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm
from typing_extensions import override

BAR_FORMAT = "{desc} {n_fmt}/{total_fmt} |{bar:24}| [{elapsed}<{remaining}, {rate_fmt}{postfix}]"
"""`step 120/1000 |###   | [01:02<07:40, 1.91step/s, 61.2 samples/s, loss 0.103]`."""


class StepProgressBar(TQDMProgressBar):
    """The run's bar: global step out of `max_steps`, samples/s, ETA and loss."""

    def __init__(self, refresh_rate: int = 1, loss_every_n_steps: int = 1) -> None:
        super().__init__(refresh_rate=refresh_rate, leave=False)
        self.loss_every_n_steps = loss_every_n_steps
        """Steps between reads of the loss shown (the logging interval)."""
        self.samples_per_step: int | None = None
        """Samples in one optimizer step over all ranks (None: not known, not shown)."""
        self._first_step = 0
        self._loss_text = ""
        """The loss as shown, read at the last logging step."""

    @override
    def init_train_tqdm(self) -> Tqdm:
        return self._bar(None, 0)

    def _bar(self, total: int | None, initial: int) -> Tqdm:
        return Tqdm(
            total=total,
            initial=initial,
            desc="step",
            position=2 * self.process_position,
            disable=self.is_disabled,
            leave=True,
            dynamic_ncols=True,
            file=sys.stdout,
            smoothing=0,  # the run's mean rate: an ETA that does not jump with every batch
            bar_format=BAR_FORMAT,
            unit="step",
        )

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.samples_per_step = samples_per_step(trainer)
        self._first_step = trainer.global_step
        # Counted from the resume point: the rate and ETA are of this launch's steps.
        self.train_progress_bar = self._bar(trainer.max_steps, trainer.global_step)

    @override
    def on_train_epoch_start(self, trainer: L.Trainer, *_: Any) -> None:
        """Nothing: the bar spans every epoch (Lightning's starts anew each one)."""

    @override
    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        bar = self._train_progress_bar
        step = trainer.global_step
        if bar is None or bar.disable or step == bar.n:  # inside gradient accumulation
            return
        if step % self.refresh_rate and step != trainer.max_steps:
            return
        bar.n = step
        bar.set_postfix_str(self._postfix(trainer, bar, outputs), refresh=False)
        bar.refresh()

    def _postfix(self, trainer: L.Trainer, bar: Any, outputs: Any) -> str:
        parts = []
        elapsed = bar.format_dict.get("elapsed", 0.0)
        if self.samples_per_step and elapsed > 0:
            rate = (trainer.global_step - self._first_step) * self.samples_per_step / elapsed
            parts.append(f"{rate:.3g} samples/s")
        step = trainer.global_step
        if step % self.loss_every_n_steps == 0 or step == trainer.max_steps:
            # The step's own output, not `callback_metrics` (which Lightning releases before
            # 2.6.6 fill only on their logging steps); a host sync, so not every step.
            loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
            self._loss_text = "" if loss is None else f"loss {float(loss):.4g}"
        if self._loss_text:
            parts.append(self._loss_text)
        return ", ".join(parts)

    @override
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Nothing: the bar is closed once, at the end of training."""

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._train_progress_bar is not None:
            self._train_progress_bar.close()


def samples_per_step(trainer: L.Trainer) -> int | None:
    """Samples in one optimizer step over all ranks: the sampler's global batch times the
    micro-batches accumulated; None when the data module has no bucket sampler."""
    sampler = getattr(getattr(trainer, "datamodule", None), "sampler", None)
    global_batch = getattr(sampler, "global_batch_size", None)
    if not isinstance(global_batch, int):
        return None
    return global_batch * trainer.accumulate_grad_batches
