"""Samples/s, FLOPs/s and model FLOPs utilisation (MFU), logged every few steps.

The rates are Lightning's `Throughput` (fabric's rolling-window computation behind its
`ThroughputMonitor`, with the same metric names: `train/device/samples_per_sec`,
`train/device/flops_per_sec`, `train/device/mfu`, and `train/samples_per_sec` etc. over all
ranks when there are several), the device's peak FLOPs its `get_available_flops` table (MFU is
logged where the peak is known: not on the CPU, not on a GPU the table lacks), and the FLOPs of
each batch `cnet_train.flops`, counted once per bucket shape with `measure_flops`.

Not `ThroughputMonitor` itself, for two reasons: it synchronises CUDA after every batch to time
it, and a training step here makes the host wait for the GPU on logging steps only; and it
reads one `flops_per_batch` from the module, where a bucketed run has one per bucket shape.
The rates here are over each logging window, timed with one sync at its end.
"""

from __future__ import annotations

import time
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.throughput import Throughput, get_available_flops
from typing_extensions import override

from cnet_train.callbacks.base import AfterBatch
from cnet_train.flops import ForwardFlops

_COMPUTE_DTYPES = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}
"""The matmul dtype of each `trainer.precision` (others: float32, or TF32 where it is on)."""


class ThroughputLogger(AfterBatch):
    """Logs Lightning's throughput metrics under `train/` every `every_n_steps` steps."""

    def __init__(self, every_n_steps: int, available_flops: float | None = None) -> None:
        self.every_n_steps = every_n_steps
        self.available_flops = available_flops
        """Peak FLOP/s of one device; None: Lightning's figure for the device, if it has one."""
        self.flops: ForwardFlops | None = None
        """The FLOP counter of the run's ControlNet and UNet (None: not a ControlNet module)."""
        self._throughput = Throughput(window_size=2)
        self._start: float | None = None
        self._samples = 0
        self._batches = 0
        self._logged_step = -1

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        device = trainer.strategy.root_device
        peak = self.available_flops
        if peak is None:
            peak = get_available_flops(
                device, _COMPUTE_DTYPES.get(trainer.precision, torch.float32)
            )
        # Two entries: the rates are those of the last logging window.
        self._throughput = Throughput(
            available_flops=peak, world_size=trainer.world_size, window_size=2
        )
        models = {name: getattr(pl_module, name, None) for name in ("controlnet", "unet")}
        watched = {name: m for name, m in models.items() if isinstance(m, torch.nn.Module)}
        self.flops = ForwardFlops(watched) if len(watched) == 2 else None
        if self.flops is not None:
            self.flops.watch()
        self._start, self._samples, self._batches = None, 0, 0
        self._logged_step = trainer.global_step

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.flops is not None:
            self.flops.unwatch()

    @override
    def after_batch(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any
    ) -> None:
        if self._start is None:  # the first batch includes start-up: measure from its end
            self._start = self._now(trainer)
            self._update(0.0, self._take_flops())
            return
        self._samples += int(batch["image"].shape[0])  # a shape: host data, no sync
        self._batches += 1
        step = trainer.global_step
        if step % self.every_n_steps or step == self._logged_step:
            return  # not a logging step, or inside its gradient accumulation
        self._logged_step = step
        flops = self._take_flops()
        self._update(self._now(trainer) - self._start, flops)
        metrics = self._throughput.compute()
        logged = {f"train/{name}": float(value) for name, value in metrics.items()}
        pl_module.log_dict(logged, rank_zero_only=True)

    def _take_flops(self) -> int | None:
        return None if self.flops is None else self.flops.take()

    def _update(self, elapsed: float, flops: int | None) -> None:
        self._throughput.update(
            time=elapsed, batches=self._batches, samples=self._samples, flops=flops
        )

    @staticmethod
    def _now(trainer: L.Trainer) -> float:
        device = trainer.strategy.root_device
        if device.type == "cuda":  # the queued kernels are part of the window's time
            torch.cuda.synchronize(device)
        return time.perf_counter()
