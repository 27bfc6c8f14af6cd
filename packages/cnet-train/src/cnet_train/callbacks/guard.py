"""Stop every rank, with a clear message, before a non-finite weight is saved or exported.

No host sync per step: each rank ORs "this loss was not finite" into a flag that stays on the
device. The ranks agree on the flag (and on the finiteness of the ControlNet's weights, which a
finite loss does not prove: an infinite learning rate turns the weights to NaN in the step after
a finite loss) only when it matters: every `every_n_steps` steps, before every checkpoint and
export, and at the end of training. A NaN does not heal, so a later check still sees it.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from typing_extensions import override

from cnet_models.gather import local_part
from cnet_train.callbacks.base import AfterBatch
from cnet_train.errors import NonFiniteLossError
from cnet_train.module import ControlNetModule

__all__ = ["NonFiniteGuard", "NonFiniteLossError"]


class NonFiniteGuard(AfterBatch):
    """The check above; the checkpoint and export callbacks are handed this guard when the
    callbacks are assembled and call `check` before each write."""

    def __init__(self, every_n_steps: int) -> None:
        self.every_n_steps = every_n_steps
        self._bad: torch.Tensor | None = None
        """True once a loss on this rank was not finite (on the loss's device)."""
        self._checked_step = 0

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._checked_step = trainer.global_step

    @override
    def after_batch(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any
    ) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if isinstance(loss, torch.Tensor):
            bad = ~torch.isfinite(loss.detach()).all()
            self._bad = bad if self._bad is None else self._bad | bad
        step = trainer.global_step
        if step % self.every_n_steps == 0 and step != self._checked_step:
            self.check(trainer, pl_module, f"step {step}")

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.check(trainer, pl_module, "the end of training")

    def check(self, trainer: L.Trainer, pl_module: L.LightningModule, before: str) -> None:
        """Raise `NonFiniteLossError` on every rank if any rank saw a non-finite loss or holds
        a non-finite weight. Every rank must call this at the same point (a collective)."""
        finite = not (self._bad is not None and bool(self._bad))
        if finite and isinstance(pl_module, ControlNetModule):
            finite = weights_finite(pl_module.controlnet)
        agreed = trainer.strategy.reduce_boolean_decision(finite, all=True)
        since = self._checked_step
        self._checked_step = trainer.global_step
        if not agreed:
            raise NonFiniteLossError(
                f"the training loss or the ControlNet's weights are not finite at {before} "
                f"(first seen after step {since}, on at least one rank); nothing non-finite was "
                "saved: the newest checkpoint and export are the last finite ones"
            )


@torch.no_grad()
def weights_finite(module: torch.nn.Module) -> bool:
    """Whether every value of `module`'s parameters this rank holds is finite (no collective)."""
    flags = [torch.isfinite(local_part(p)).all() for p in module.parameters()]
    return bool(torch.stack(flags).all()) if flags else True
