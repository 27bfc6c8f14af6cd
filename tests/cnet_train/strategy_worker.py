"""One rank of the strategy matrix (run by test_strategies.py, not collected by pytest).

Usage: python strategy_worker.py CONFIG_YAML OUT_DIR [KILL_AT_STEP], with torchrun's environment
variables set. Trains CONFIG (its strategy and devices as the YAML says) and writes what this
rank did to OUT_DIR/rank-N.json. With KILL_AT_STEP, the process sends itself SIGKILL at the
start of the batch after that optimizer step (its checkpoint, if due, is then on disk): the
worker dies as a preempted or OOM-killed job would, in the middle of training.
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from typing_extensions import override

from cnet_train.callbacks.base import AfterBatch
from cnet_train.config_io import load_config
from cnet_train.module import ControlNetModule
from cnet_train.trainer import fit


class Record(AfterBatch):
    """The optimizer steps this rank took, the buckets of its batches, and the dtypes its
    convolutions computed in."""

    def __init__(self, kill_at: int | None) -> None:
        self.kill_at = kill_at
        self.steps: list[int] = []
        self.buckets: list[int] = []
        self.conv_dtypes: dict[str, set[str]] = {"vae": set(), "controlnet": set()}
        """The output dtypes of the VAE's and the ControlNet's convolutions in training
        forwards (batch start to backward: validation renders are not counted)."""
        self.controlnet_weights: set[str] = set()
        """The dtypes of the ControlNet's convolution weights as its training forwards see
        them (FSDP2 gathers them in its mixed-precision policy's dtype)."""
        self.recording = False

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        assert isinstance(pl_module, ControlNetModule)
        for part, module in (("vae", pl_module.vae), ("controlnet", pl_module.controlnet)):
            for conv in module.modules():
                if isinstance(conv, torch.nn.Conv2d):
                    conv.register_forward_hook(self._hook(part))

    def _hook(self, part: str) -> Callable[[torch.nn.Module, Any, torch.Tensor], None]:
        def record(_module: torch.nn.Module, _inputs: Any, output: torch.Tensor) -> None:
            if self.recording:
                self.conv_dtypes[part].add(str(output.dtype).removeprefix("torch."))
                if part == "controlnet":
                    weight = _module.weight
                    self.controlnet_weights.add(str(weight.dtype).removeprefix("torch."))

        return record

    @override
    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.kill_at is not None and trainer.global_step == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        self.recording = True

    @override
    def on_before_backward(
        self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor
    ) -> None:
        self.recording = False

    @override
    def after_batch(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any
    ) -> None:
        self.steps.append(trainer.global_step)
        self.buckets.append(int(batch["bucket"][0]))


def main(config_path: Path, out: Path, kill_at: int | None) -> None:
    config = load_config(config_path)
    if config.trainer.strategy == "deepspeed" and os.environ.get("DS_ACCELERATOR") == "cpu":
        importlib.import_module("deepspeed_cpu")  # the test-only shim, beside this file
    record = Record(kill_at)
    trainer, _ = fit(config, enable_progress_bar=False, callbacks_extra=[record])
    result = {
        "rank": trainer.global_rank,
        "steps": record.steps,
        "buckets": record.buckets,
        "conv_dtypes": {part: sorted(seen) for part, seen in record.conv_dtypes.items()},
        "controlnet_weights": sorted(record.controlnet_weights),
    }
    (out / f"rank-{trainer.global_rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    main(Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else None)
