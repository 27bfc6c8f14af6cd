"""Training throughput per setting: samples/s, MFU and peak memory next to the memory plan.

    python benchmarks/gpu_throughput.py [--tiny] [--families sd15,sd21,sdxl]
        [--settings eager,bf16-frozen,...] [--warmup 3] [--steps 5] [--batch N]
        [--budget-s 420] [--json FILE]

On a GPU: full-size random-weight networks (architectures from the shipped configs, nothing
downloaded) of SD1.5 at 512, SD2.1 at 768 and SDXL at 1024 px, trained by the module and
Lightning as a launch trains them (EMA included; no checkpoints, exports or validation). One
row per setting:

- `eager`: frozen parts in float32, attention through SDPA's math kernel only;
- `bf16-frozen`: the frozen parts in bfloat16;
- `sdpa`: + SDPA free to pick its fused kernels (flash, memory-efficient);
- `channels-last`: + convolution weights and inputs in channels-last order;
- `compile`: `sdpa` + regional compilation of the UNet and ControlNet blocks (`trainer.compile`);
- `unet-ckpt`: `sdpa` + UNet gradient checkpointing;
- `latent-cache`: `sdpa` with the VAE's latents read from a cache (`cnet-train encode`, run
  before the timed steps) instead of encoded in the step;
- `deepspeed`: `sdpa` under DeepSpeed ZeRO-2 on one device; `fsdp`: `sdpa` under FSDP2.

Each row: the median of `--steps` timed step times after `--warmup` steps (CUDA events at the
end of every batch, read after the run: no synchronisation inside it), samples/s, the model
FLOPs per sample (ControlNet forward and backward, UNet forward and its input-gradient backward,
counted by `cnet_train.flops`) and the VAE encode's, MFU against the device's bf16 peak (model
FLOPs, then with the encode), peak allocated memory and the plan's prediction
(`cnet-train plan`). Rows run setting by setting over the families, and stop once `--budget-s`
is spent (the rest are named as skipped).

`--tiny` (the default without CUDA): the same rows on the CPU with tiny models at 64 px (the
GPU-only ones skipped), so that CI keeps the script working; its times say nothing of a GPU.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
import time
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import attrs
import lightning as L
import torch
from lightning.fabric.utilities.throughput import get_available_flops, measure_flops
from torch.nn.attention import SDPBackend, sdpa_kernel
from typing_extensions import override

from cnet_data.buckets import BucketConfig
from cnet_data.sources import SourceConfig
from cnet_data.synthetic import write_fill_dataset
from cnet_models.configs import REFERENCE_MODELS
from cnet_models.facade import AutoencoderKL
from cnet_models.families import FamilyName
from cnet_models.loading import BaseModel
from cnet_train.callbacks.base import AfterBatch
from cnet_train.callbacks.ema import EMACallback
from cnet_train.callbacks.throughput import ThroughputLogger
from cnet_train.config import TrainConfig
from cnet_train.data import ControlNetDataModule
from cnet_train.demo import demo_config
from cnet_train.encode import encode_latents
from cnet_train.memory_fix import with_overrides
from cnet_train.memory_plan import GiB, Planner
from cnet_train.module import ControlNetModule
from cnet_train.trainer import build_trainer

sys.path.insert(0, str(Path(__file__).parent))
from gpu_smoke import fullsize_base  # a sibling script, not a package

FULL_SIZE: dict[FamilyName, tuple[int, int]] = {
    "sd15": (512, 16),
    "sd21": (768, 8),
    "sdxl": (1024, 4),
}
"""Side in pixels and batch per family at full size."""
TINY_SIZE = (64, 2)

_SDPA = ("model.frozen_dtype=bfloat16",)
SETTINGS: dict[str, tuple[tuple[str, ...], bool]] = {
    "eager": (("model.frozen_dtype=float32",), True),
    "bf16-frozen": (_SDPA, True),
    "sdpa": (_SDPA, False),
    "channels-last": ((*_SDPA, "trainer.channels_last=true"), False),
    "compile": ((*_SDPA, "trainer.compile=true"), False),
    "unet-ckpt": ((*_SDPA, "controlnet.unet_gradient_checkpointing=true"), False),
    "deepspeed": ((*_SDPA, "trainer.strategy=deepspeed"), False),
    "fsdp": ((*_SDPA, "trainer.strategy=fsdp"), False),
    "latent-cache": ((*_SDPA, "data.augment.random_crop=false", "latents.path=LATENTS"), False),
}
"""Per setting: the config overrides, and whether attention is held to SDPA's math kernel."""
GPU_ONLY = {"deepspeed", "compile"}
"""Not run in tiny mode: DeepSpeed needs CUDA here, and Inductor on a CPU costs minutes."""


@attrs.frozen
class Row:
    family: str
    setting: str
    batch: int
    side: int
    step_s: float
    samples_per_s: float
    model_gflop_per_sample: float
    encode_gflop_per_sample: float
    mfu: float | None
    mfu_with_encode: float | None
    peak_gib: float | None
    plan_gib: float


class StepClock(AfterBatch):
    """A timestamp at the end of every training batch: a CUDA event on the GPU (read after the
    run, so the host never waits inside it), the wall clock on the CPU."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self.events: list[torch.cuda.Event] = []
        self.times: list[float] = []

    @override
    def after_batch(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any
    ) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
            event.record()
            self.events.append(event)
        else:
            self.times.append(time.perf_counter())

    def step_seconds(self) -> list[float]:
        if not self.cuda:
            return [b - a for a, b in zip(self.times, self.times[1:], strict=False)]
        torch.cuda.synchronize()
        pairs = zip(self.events, self.events[1:], strict=False)
        return [a.elapsed_time(b) / 1000 for a, b in pairs]


def row_config(
    work: Path, family: FamilyName, setting: str, *, side: int, batch: int, steps: int
) -> TrainConfig:
    """The tiny demo's config for `family`, on a one-bucket fill dataset at `side` px, with the
    setting's overrides."""
    config = demo_config(work / family, family, steps=steps, samples=4)
    data = work / f"{family}-{side}-{batch * steps}"
    manifest = data / "manifest.jsonl"
    if not manifest.exists():
        manifest = write_fill_dataset(data, batch * steps, sizes=((side, side),))
    cuda = torch.cuda.is_available()
    config = attrs.evolve(
        config,
        run_dir=work / f"run-{family}-{setting}",
        data=attrs.evolve(
            config.data,
            source=SourceConfig(manifest),
            buckets=BucketConfig(area=side * side, min_side=side, max_side=side, step=16),
            batch_size=batch,
            num_workers=4 if cuda else 0,
        ),
        validation=attrs.evolve(config.validation, prompts=(), images=()),
    )
    trainer = [
        f"trainer.max_steps={steps}",
        "trainer.devices=1",
        f"trainer.accelerator={'gpu' if cuda else 'cpu'}",
        "trainer.precision=bf16-mixed",
        "trainer.log_every_n_steps=1000000",
        "controlnet.unet_gradient_checkpointing=false",
    ]
    latents = str(work / f"latents-{family}-{setting}")
    changes = [change.replace("LATENTS", latents) for change in SETTINGS[setting][0]]
    return with_overrides(config, [*trainer, *changes])


def encode_flops(vae: AutoencoderKL, batch: int, side: int) -> int:
    """FLOPs of the VAE encoding one batch (no backward), counted on a meta copy."""
    with torch.device("meta"):
        copy = AutoencoderKL.from_config(dict(vae.config)).float()
    images = torch.empty(batch, 3, side, side, device="meta")
    with torch.no_grad():
        return measure_flops(copy, lambda: copy.encode(images, return_dict=False))


def planned_peak(config: TrainConfig, family: FamilyName, tiny: bool) -> int:
    """The plan's peak for `config`; at full size from the shipped architectures of the family
    (the hub's reference model, not on this machine, falls back to them)."""
    if not tiny:
        model = attrs.evolve(config.model, source=REFERENCE_MODELS[family])
        config = attrs.evolve(config, model=model)
    return Planner().plan(config).peak


def run_row(work: Path, family: FamilyName, setting: str, args: argparse.Namespace) -> Row:
    side, batch = TINY_SIZE if args.tiny else FULL_SIZE[family]
    batch = args.batch or batch
    steps = args.warmup + args.steps + 1
    config = row_config(work, family, setting, side=side, batch=batch, steps=steps)
    cuda = not args.tiny
    dtype = torch.float32 if config.model.frozen_dtype == "float32" else torch.bfloat16
    L.seed_everything(config.seed, verbose=False)
    base: BaseModel | None = None
    if cuda:
        base = fullsize_base(Path(config.model.source), family, dtype)
    with torch.device("cuda") if cuda else nullcontext():
        module = ControlNetModule(config, base=base)
    if config.latents.path is not None:  # encoded before the run, not timed
        encode_latents(config, vae=module.vae)
    clock, flops = StepClock(cuda), ThroughputLogger(every_n_steps=10**9)
    trainer = build_trainer(
        config,
        callbacks=[EMACallback(config.ema.config), flops, clock],
        enable_checkpointing=False,
        logger=False,
        enable_progress_bar=False,
    )
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    with _attention(SETTINGS[setting][1]):
        trainer.fit(module, datamodule=ControlNetDataModule(config))
    step_s = statistics.median(clock.step_seconds()[args.warmup :])
    model = sum(flops.flops.counts.values()) / batch if flops.flops else 0.0
    encode = encode_flops(module.vae, batch, side) / batch
    peak_flops = get_available_flops(trainer.strategy.root_device, torch.bfloat16)
    rate = batch / step_s
    return Row(
        family=family,
        setting=setting,
        batch=batch,
        side=side,
        step_s=step_s,
        samples_per_s=rate,
        model_gflop_per_sample=model / 1e9,
        encode_gflop_per_sample=encode / 1e9,
        mfu=model * rate / peak_flops if peak_flops else None,
        mfu_with_encode=(model + encode) * rate / peak_flops if peak_flops else None,
        peak_gib=torch.cuda.max_memory_allocated() / GiB if cuda else None,
        plan_gib=planned_peak(config, family, args.tiny) / GiB,
    )


def _attention(math_only: bool) -> AbstractContextManager[None]:
    return sdpa_kernel(SDPBackend.MATH) if math_only else nullcontext()


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


HEADER = (
    f"{'family':<6} {'setting':<13} {'batch':>5} {'side':>5} {'step s':>8} "
    f"{'samples/s':>10} {'GF/sample':>10} {'+encode':>8} {'MFU':>7} {'MFU+enc':>8} "
    f"{'peak GiB':>9} {'plan GiB':>9}"
)


def table_line(r: Row) -> str:
    peak = "-" if r.peak_gib is None else f"{r.peak_gib:.2f}"
    return (
        f"{r.family:<6} {r.setting:<13} {r.batch:>5} {r.side:>5} {r.step_s:>8.4f} "
        f"{r.samples_per_s:>10.2f} {r.model_gflop_per_sample:>10.2f} "
        f"{r.encode_gflop_per_sample:>8.2f} {_percent(r.mfu):>7} "
        f"{_percent(r.mfu_with_encode):>8} {peak:>9} {r.plan_gib:>9.2f}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny models on the CPU")
    parser.add_argument("--families", default="sd15,sd21,sdxl")
    parser.add_argument("--settings", default=",".join(SETTINGS))
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--steps", type=int, default=5, help="timed steps (median)")
    parser.add_argument("--batch", type=int, default=0, help="batch per row (0: per family)")
    parser.add_argument("--budget-s", type=float, default=420.0, help="stop starting rows after")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)
    args.tiny = args.tiny or not torch.cuda.is_available()
    unknown = set(args.settings.split(",")) - set(SETTINGS)
    if unknown:
        parser.error(f"unknown settings {sorted(unknown)}; known: {', '.join(SETTINGS)}")
    where = "CPU, tiny models" if args.tiny else torch.cuda.get_device_name()
    print(f"gpu_throughput on {where}, torch {torch.__version__}")
    print(HEADER, flush=True)
    rows, skipped = run_all(args)  # each row printed (and saved) as it is done
    for name, why in skipped:
        print(f"skipped {name}: {why}")
    _save(args.json, rows, skipped)
    return 0


def _save(path: Path | None, rows: list[Row], skipped: list[tuple[str, str]]) -> None:
    if path is not None:
        payload = {"rows": [attrs.asdict(r) for r in rows], "skipped": skipped}
        path.write_text(json.dumps(payload, indent=1))


def run_all(args: argparse.Namespace) -> tuple[list[Row], list[tuple[str, str]]]:
    start = time.perf_counter()
    rows: list[Row] = []
    skipped: list[tuple[str, str]] = []
    with tempfile.TemporaryDirectory(prefix="cnet-throughput-") as tmp:
        # Setting by setting, each over the families: the first settings reach every family
        # before the budget runs out.
        for setting in args.settings.split(","):
            for family in args.families.split(","):
                name = f"{family} {setting}"
                if args.tiny and setting in GPU_ONLY:
                    skipped.append((name, "GPU only"))
                elif time.perf_counter() - start > args.budget_s:
                    skipped.append((name, f"--budget-s {args.budget_s:.0f} spent"))
                else:
                    _run_one(Path(tmp), family, setting, args, rows=rows, skipped=skipped)
    return rows, skipped


def _run_one(
    work: Path,
    family: FamilyName,
    setting: str,
    args: argparse.Namespace,
    *,
    rows: list[Row],
    skipped: list[tuple[str, str]],
) -> None:
    """One row; on a GPU a failing row (out of memory, a missing package) is noted and the
    table goes on, since a GPU session is short; in tiny mode (CI) a failure fails the run."""
    try:
        rows.append(run_row(work, family, setting, args))
        print(table_line(rows[-1]), flush=True)
    except Exception as error:
        if args.tiny:
            raise
        skipped.append((f"{family} {setting}", f"failed: {type(error).__name__}: {error}"[:300]))
        print(f"{family} {setting}: {skipped[-1][1]}", flush=True)
    _save(args.json, rows, skipped)  # what is done survives a timeout
    if not args.tiny:
        gc.collect()
        torch.cuda.empty_cache()


if __name__ == "__main__":
    sys.exit(main())
