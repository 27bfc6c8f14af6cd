"""What a run says about itself: a start-up summary and an end summary, printed by rank 0.

The start-up summary answers what a user otherwise digs out of logs and code: how many samples
were indexed and how many were skipped as bad (and where they are listed), the buckets, their
area and where it came from (`data.buckets`, the model family, or the default when the family
is unknown), and what each epoch leaves out, the batch per device and in all, the optimizer
steps per epoch, the strategy, precision and devices, and whether the run starts fresh or
resumes (and from which checkpoint). The end summary lists where the results are: the newest
export (ControlNet and its EMA twin), the newest validation grid, the loss curve, the
checkpoint, the resolved config and the TensorBoard logs; only what exists is listed.

Lines go to stdout as plain text through `say`, which writes above an open progress bar.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import lightning as L
import numpy as np
import tqdm
from typing_extensions import override

from cnet_data.buckets import Bucket
from cnet_train.config import TrainConfig
from cnet_train.config_io import CONFIG_FILE_NAME
from cnet_train.data import ControlNetDataModule
from cnet_train.resume import checkpoint_dir, committed_checkpoints

LABEL_WIDTH = 18
"""Column where the values of summary lines start."""

MAX_BUCKETS_LISTED = 6
"""Buckets named in the start-up summary (the most used); the rest are counted."""


def say(line: str) -> None:
    """Print `line` to stdout; an open tqdm bar is cleared first and drawn again after it."""
    tqdm.tqdm.write(line, file=sys.stdout)


def field(label: str, value: object) -> str:
    """One aligned `  label:  value` line."""
    return f"  {label + ':':<{LABEL_WIDTH}}{value}"


class RunSummary(L.Callback):
    """Prints the start-up summary when training starts and the end summary when `fit` ends
    (rank 0; neither on a run stopped by an error or a signal, which reports itself)."""

    def __init__(self, config: TrainConfig) -> None:
        self.config = config
        self._started = 0.0
        self._first_step = 0

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._started = time.monotonic()
        self._first_step = trainer.global_step
        if trainer.is_global_zero:
            for line in start_lines(trainer, self.config):
                say(line)

    @override
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        took = time.monotonic() - self._started if self._started else 0.0
        steps = trainer.global_step - self._first_step
        for line in end_lines(trainer, self.config, steps=steps, seconds=took):
            say(line)


# --- the start


def start_lines(trainer: L.Trainer, config: TrainConfig) -> list[str]:
    """The start-up summary of `trainer` about to train as `config` says."""
    lines = [f"cnet-train: run {config.run_dir}"]
    data = getattr(trainer, "datamodule", None)
    if isinstance(data, ControlNetDataModule):
        lines += list(_data_lines(trainer, data))
    lines += _engine_lines(trainer, config)
    lines.append(field("resume", _resume_point(trainer)))
    return lines


def _data_lines(trainer: L.Trainer, data: ControlNetDataModule) -> Iterator[str]:
    sampler, dataset = data.sampler, data.dataset
    if sampler is None or dataset is None:
        return
    index = dataset.index
    yield field("samples", f"{len(index)} indexed in {index.directory}")
    yield field("skipped as bad", _bad_samples(index.directory, index.header))
    counts = np.bincount(sampler.bucket_ids, minlength=len(dataset.table))
    yield field("buckets", _buckets(counts, dataset.table.buckets, len(sampler.merges)))
    if data.buckets is not None:
        yield field("bucket area", f"{data.buckets.area}: {data.buckets.origin}")
    total = int(sampler.raw_bucket_ids.size)
    yield field(
        "left out / epoch",
        f"{sampler.dropped_per_epoch} of {total} samples (partial global batches of "
        f"{sampler.global_batch_size}, drawn anew each epoch)",
    )
    accumulate = trainer.accumulate_grad_batches
    per_step = sampler.global_batch_size * accumulate
    yield field(
        "batch",
        f"{sampler.batch_size} per device, {sampler.global_batch_size} global "
        f"({sampler.batch_size} x {sampler.num_replicas} device"
        f"{'s' if sampler.num_replicas != 1 else ''})"
        + (f", {per_step} per optimizer step ({accumulate} accumulated)" if accumulate > 1 else ""),
    )
    per_epoch = math.ceil(len(sampler) / accumulate)
    epochs = trainer.max_steps / per_epoch if per_epoch else 0.0
    yield field(
        "steps",
        f"{per_epoch} per epoch; max_steps {trainer.max_steps} (about {epochs:.3g} epoch"
        f"{'s' if f'{epochs:.3g}' != '1' else ''})",
    )


def _bad_samples(directory: Path, header: dict[str, object]) -> str:
    """How many samples the scan skipped, and the report that lists them (written beside the
    index by `cnet-data index` and by the launch that builds it)."""
    scan = header.get("scan")
    bad = scan.get("bad") if isinstance(scan, dict) else None
    report = directory.with_name(directory.name + ".report.json")
    if not isinstance(bad, int):
        return "not recorded in this index"
    if bad == 0:
        return "none"
    where = f", listed in {report}" if report.is_file() else ""
    return f"{bad} sample{'s' if bad != 1 else ''}{where}"


def _buckets(counts: np.ndarray, buckets: tuple[Bucket, ...], merged: int) -> str:
    """The buckets that hold samples, the fullest first, with their sample counts."""
    used = sorted(((int(n), buckets[i]) for i, n in enumerate(counts) if n), key=lambda u: -u[0])
    named = ", ".join(f"{b.width}x{b.height} ({n})" for n, b in used[:MAX_BUCKETS_LISTED])
    more = len(used) - MAX_BUCKETS_LISTED
    text = f"{len(used)} in use of {len(buckets)}: {named}" + (f", {more} more" if more > 0 else "")
    if merged:
        text += f"; {merged} too small for a global batch merged into neighbours"
    return text


def _engine_lines(trainer: L.Trainer, config: TrainConfig) -> list[str]:
    t = config.trainer
    device = trainer.strategy.root_device.type
    devices = trainer.num_devices
    nodes = trainer.num_nodes
    return [
        field("strategy", f"{type(trainer.strategy).__name__} (trainer.strategy: {t.strategy})"),
        field("precision", f"{t.precision} (Lightning {trainer.precision})"),
        field(
            "devices",
            f"{devices} {device} device{'s' if devices != 1 else ''} x {nodes} node"
            f"{'s' if nodes != 1 else ''} = {trainer.world_size} process"
            f"{'es' if trainer.world_size != 1 else ''}",
        ),
    ]


def _resume_point(trainer: L.Trainer) -> str:
    if trainer.ckpt_path is None:
        return "fresh start"
    return f"step {trainer.global_step} from {trainer.ckpt_path}"


# --- the end


def end_lines(trainer: L.Trainer, config: TrainConfig, *, steps: int, seconds: float) -> list[str]:
    """The end summary: where the run stopped and where its results are (what exists)."""
    run = config.run_dir
    lines = [
        f"cnet-train: finished at step {trainer.global_step} of {trainer.max_steps} "
        f"({steps} step{'s' if steps != 1 else ''} in {_duration(seconds)} this launch)"
    ]
    export = newest(run / "exports", "step-*", folders=True)
    if export is not None:
        for name, label in (("controlnet", "ControlNet"), ("controlnet_ema", "EMA ControlNet")):
            if (export / name).is_dir():
                lines.append(field(label, export / name))
    grid = newest(run / "validation", "step-*.png")
    if grid is not None:
        lines.append(field("validation grid", grid))
    curves = [p for p in (run / "loss.csv", run / "loss.png") if p.is_file()]
    if curves:
        lines.append(field("loss curve", ", ".join(str(p) for p in curves)))
    checkpoints = committed_checkpoints(checkpoint_dir(config))
    if checkpoints:
        lines.append(field("checkpoint", checkpoints[-1]))
    for label, path in (("config", run / CONFIG_FILE_NAME), ("TensorBoard logs", run / "logs")):
        if path.exists():
            lines.append(field(label, path))
    return lines


def newest(folder: Path, pattern: str, *, folders: bool = False) -> Path | None:
    """The last of `folder`'s entries matching `pattern` in name order (the names carry
    zero-padded steps); hidden, half-written entries do not match."""
    if not folder.is_dir():
        return None
    found = sorted(p for p in folder.glob(pattern) if (p.is_dir() if folders else p.is_file()))
    return found[-1] if found else None


def _duration(seconds: float) -> str:
    whole = round(seconds)
    hours, rest = divmod(whole, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"
