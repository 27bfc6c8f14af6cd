"""Seconds per training step on one CPU thread, and the time from launch to the first step.

    python benchmarks/train_step.py [--steps 10] [--warmup 3]

1. Steady state: `ControlNetModule.loss(batch, step)`, backward and the optimizer step in a
   plain loop (no Lightning), tiny sd15 at batch 4 x 64 px and tiny sdxl at batch 4 x 128 px,
   float32, `torch.set_num_threads(1)`; the median over `--steps` after `--warmup` steps.
   Batches are random samples in the dataset's ranges, collated by the loader's
   `collate_samples`, so image decoding is not in the figure: benchmarks/data_pipeline.py
   measures that.
2. Start-up: a fresh `python -c` that does what `cnet-train launch` does (load the YAML, `fit`)
   for one step on a fresh run directory (so the index is built, as at a first launch); the
   time from just before the process starts to the end of its first training step.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import attrs
import torch

from cnet_data.batch import Batch, Sample, collate_samples
from cnet_models.families import FamilyName
from cnet_train.config import TrainConfig
from cnet_train.config_io import dump_config
from cnet_train.demo import demo_config
from cnet_train.module import ControlNetModule
from cnet_train.optim import build_optimizer

CASES: tuple[tuple[FamilyName, int, int], ...] = (("sd15", 4, 64), ("sdxl", 4, 128))
"""(family, batch size, square side in pixels)."""

# The launch, as `cnet-train launch CONFIG` runs it, plus one callback that stamps the wall
# clock when the first training step has finished.
LAUNCH = r"""
import sys, time
import lightning as L
import torch
torch.set_num_threads(1)
from cnet_train.config_io import load_config
from cnet_train.trainer import build_callbacks, fit
imported = time.time()

class FirstStep(L.Callback):
    def on_train_batch_end(self, *args):
        print(f"FIRST_STEP {time.time()} IMPORTED {imported}", flush=True)

config = load_config(sys.argv[1])
fit(config, callbacks=[*build_callbacks(config), FirstStep()], enable_progress_bar=False)
"""


def make_batch(batch_size: int, side: int, seed: int) -> Batch:
    """Random samples in the dataset's ranges, collated as the training loader collates them."""
    g = torch.Generator().manual_seed(seed)
    size = torch.tensor([side, side], dtype=torch.int64)
    samples = [
        Sample(
            image=torch.rand(3, side, side, generator=g) * 2 - 1,
            conditioning_image=torch.rand(3, side, side, generator=g),
            caption=f"a red circle on a blue background {i}",
            caption_key=f"{i:032x}",
            original_size=size.clone(),
            crop_top_left=torch.zeros(2, dtype=torch.int64),
            target_size=size.clone(),
            bucket=0,
            index=i,
            variant=0,
        )
        for i in range(batch_size)
    ]
    return collate_samples(samples)


def step_seconds(config: TrainConfig, batch: Batch, steps: int, warmup: int) -> list[float]:
    """Wall time of each measured step of a plain loop: loss, backward, optimizer step."""
    module = ControlNetModule(config)
    params = [p for p in module.controlnet.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, config.optimizer, None)
    times = []
    for step in range(warmup + steps):
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        torch.autograd.backward(module.loss(batch, step))  # typed, unlike Tensor.backward
        optimizer.step()
        if step >= warmup:
            times.append(time.perf_counter() - start)
    return times


def launch_seconds(config: TrainConfig, folder: Path) -> tuple[float, float, float]:
    """(imports done, first step done, process exit), in seconds after the process started."""
    path = folder / "launch.yaml"
    path.write_text(dump_config(config), encoding="utf-8")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    start = time.time()
    done = subprocess.run(
        [sys.executable, "-c", LAUNCH, str(path)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    ended = time.time() - start
    marks = [line.split() for line in done.stdout.splitlines() if line.startswith("FIRST_STEP")]
    if done.returncode != 0 or not marks:
        raise RuntimeError(f"the launch failed ({done.returncode}):\n{done.stderr[-3000:]}")
    first, imported = float(marks[0][1]), float(marks[0][3])
    return imported - start, first - start, ended


def one_step_config(config: TrainConfig, batch_size: int) -> TrainConfig:
    """The demo config cut to one step, float32 on the CPU, without validation images."""
    return attrs.evolve(
        config,
        data=attrs.evolve(config.data, batch_size=batch_size),
        validation=attrs.evolve(config.validation, prompts=(), images=()),
        trainer=attrs.evolve(config.trainer, max_steps=1, precision="32", accelerator="cpu"),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="measured steps per model")
    parser.add_argument("--warmup", type=int, default=3, help="unmeasured steps first")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, CPU, 1 thread, float32; random samples, collated")
    print(f"steady state: median of {args.steps} steps after {args.warmup} warm-up steps")
    print(f"{'model':<10} {'batch':>5} {'px':>5} {'s/step':>8} {'min':>8} {'max':>8}")
    with tempfile.TemporaryDirectory(prefix="cnet-train-step-") as tmp:
        configs = {}
        for family, batch_size, side in CASES:
            config = demo_config(Path(tmp) / family, family, steps=1, samples=12)
            configs[family] = one_step_config(config, batch_size)
            times = step_seconds(
                configs[family], make_batch(batch_size, side, 0), args.steps, args.warmup
            )
            print(
                f"tiny {family:<5} {batch_size:>5} {side:>5} {statistics.median(times):>8.4f} "
                f"{min(times):>8.4f} {max(times):>8.4f}"
            )
        print(
            "launch-equivalent start (python -c: load the YAML, fit 1 step on the demo dataset; "
            "fresh run dir, so the index is built):"
        )
        for family, _, _ in CASES:
            imported, first, ended = launch_seconds(configs[family], Path(tmp) / family)
            print(
                f"tiny {family:<5} imports done {imported:5.1f} s, first step done {first:5.1f} s "
                f"after process start (process exit {ended:5.1f} s)"
            )


if __name__ == "__main__":
    main()
