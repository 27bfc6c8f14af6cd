"""A real `cnet-train launch` with ways to fail (run by test_crash_safety.py, not collected).

Usage: python crash_worker.py CONFIG_YAML [--trace FILE] [--kill-at N] [--progress FILE]
       [--step-delay S] [--nan-rank R --nan-step S]

Runs `cnet_train.cli.main(["launch", CONFIG_YAML])` and exits with its code, so every error
path is the console script's own. Every write primitive of the process (`torch.save`,
safetensors' `save_file`, `os.replace`, `os.rename`, `os.fsync`) is counted; with `--trace`
each is logged as `N<TAB>KIND<TAB>PATH`. With `--kill-at N` the process SIGKILLs itself at the
N-th: a file write is torn first (half of its bytes written), a rename or fsync is not done.
`--progress` records each optimizer step as it ends; `--step-delay` sleeps after each batch,
widening the windows in which a test's signal lands; `--nan-rank/--nan-step` make one rank's
loss NaN from that step on (torchrun's environment variables name the rank).
"""

from __future__ import annotations

import argparse
import io
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import safetensors.torch
import torch
from typing_extensions import override

from cnet_data.batch import Batch
from cnet_train import trainer as trainer_module
from cnet_train.callbacks.base import AfterBatch
from cnet_train.cli import main as cli_main
from cnet_train.module import ControlNetModule


class Writes:
    """Counts write primitives; logs them; kills the process at the chosen one."""

    def __init__(self, kill_at: int | None, trace: Path | None) -> None:
        self.kill_at = kill_at
        self.count = 0
        self.trace = trace.open("a", encoding="utf-8", buffering=1) if trace else None

    def hit(self, kind: str, path: object, torn: bytes | None = None, into: Any = None) -> None:
        self.count += 1
        if self.trace is not None:
            self.trace.write(f"{self.count}\t{kind}\t{path}\n")
        if self.count != self.kill_at:
            return
        if torn is not None:  # half of the file's bytes reach the disk, then the kill
            if hasattr(into, "write"):
                into.write(torn[: len(torn) // 2])
                into.flush()
            else:
                Path(str(into)).write_bytes(torn[: len(torn) // 2])
        os.kill(os.getpid(), signal.SIGKILL)


def instrument(writes: Writes) -> None:
    real_save, real_save_file = torch.save, safetensors.torch.save_file
    real_replace, real_rename, real_fsync = os.replace, os.rename, os.fsync

    def save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        if writes.kill_at == writes.count + 1:
            buf = io.BytesIO()
            real_save(obj, buf, *args, **kwargs)
            writes.hit("torch.save", getattr(f, "name", f), buf.getvalue(), f)
        writes.hit("torch.save", getattr(f, "name", f))
        real_save(obj, f, *args, **kwargs)

    def save_file(tensors: Any, filename: Any, metadata: Any = None) -> None:
        if writes.kill_at == writes.count + 1:
            data = safetensors.torch.save(tensors, metadata=metadata)
            writes.hit("save_file", filename, data, filename)
        writes.hit("save_file", filename)
        real_save_file(tensors, filename, metadata=metadata)

    def replace(src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
        writes.hit("replace", dst)
        real_replace(src, dst, *args, **kwargs)

    def rename(src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
        writes.hit("rename", dst)
        real_rename(src, dst, *args, **kwargs)

    def fsync(fd: Any) -> None:
        fileno = fd if isinstance(fd, int) else fd.fileno()
        try:
            target = os.readlink(f"/proc/self/fd/{fileno}")
        except OSError:
            target = "?"
        writes.hit("fsync", target)
        real_fsync(fd)

    torch.save, safetensors.torch.save_file = save, save_file
    os.replace, os.rename, os.fsync = replace, rename, fsync


class Progress(AfterBatch):
    def __init__(self, path: Path | None, delay: float) -> None:
        self.path, self.delay = path, delay

    @override
    def after_batch(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any
    ) -> None:
        if self.path is not None and trainer.is_global_zero:
            with self.path.open("a", encoding="utf-8") as fh:
                fh.write(f"{trainer.global_step}\n")
        time.sleep(self.delay)


def poison(rank: int, step: int) -> None:
    real_loss = ControlNetModule.loss

    def loss(self: ControlNetModule, batch: Batch, at: int, micro: int = 0) -> torch.Tensor:
        value = real_loss(self, batch, at, micro)
        if self.global_rank == rank and at >= step:
            return value * float("nan")
        return value

    setattr(ControlNetModule, "loss", loss)  # noqa: B010 (a test patch of a method)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("config")
    parser.add_argument("--trace", type=Path)
    parser.add_argument("--kill-at", type=int)
    parser.add_argument("--progress", type=Path)
    parser.add_argument("--step-delay", type=float, default=0.0)
    parser.add_argument("--nan-rank", type=int)
    parser.add_argument("--nan-step", type=int, default=0)
    args = parser.parse_args()
    instrument(Writes(args.kill_at, args.trace))
    if args.nan_rank is not None:
        poison(args.nan_rank, args.nan_step)
    real_build = trainer_module.build_callbacks

    def build_callbacks(*a: Any, **kw: Any) -> list[L.Callback]:
        return [*real_build(*a, **kw), Progress(args.progress, args.step_delay)]

    trainer_module.build_callbacks = build_callbacks
    return cli_main(["launch", args.config])


if __name__ == "__main__":
    sys.exit(main())
