"""GPU smoke test: a few bf16 training steps on CUDA, from tiny models to full-size SDXL.

    python benchmarks/gpu_smoke.py [--steps 6] [--batch-size 2] [--skip-fullsize]

1. Each tiny family (sd15, sd21, sdxl): a tiny random model and a small fill dataset, trained by
   `fit` exactly as `cnet-train launch` would (validation, EMA, export, checkpoints included),
   in bf16-mixed with the frozen parts in bfloat16, on one GPU.
2. Full-size SDXL (UNet, VAE, both text encoders at real size, random weights built on the GPU,
   nothing downloaded) with a new ControlNet, trained on 1024x1024 buckets under DeepSpeed
   ZeRO-2 (one device without it, said so); prints samples/s and peak GPU memory.

Without CUDA it says so and exits 0 (`nox -s gpu_smoke` skips before getting here).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import attrs
import lightning as L
import torch
from typing_extensions import override

from cnet_data.buckets import BucketConfig
from cnet_data.sources import SourceConfig
from cnet_data.synthetic import write_fill_dataset
from cnet_models.facade import CLIPTextConfig, TextEncoder, load_scheduler, load_tokenizer
from cnet_models.families import FAMILY_NAMES, family_by_name
from cnet_models.fullsize import build_fullsize, load_arch_config, text_encoder_class
from cnet_models.loading import BaseModel
from cnet_train.callbacks.base import AfterBatch
from cnet_train.callbacks.data_progress import DataProgress
from cnet_train.callbacks.ema import EMACallback
from cnet_train.callbacks.guard import NonFiniteGuard
from cnet_train.config import TrainConfig
from cnet_train.data import ControlNetDataModule
from cnet_train.demo import demo_config
from cnet_train.module import ControlNetModule
from cnet_train.trainer import build_trainer, fit

_TOKEN_IDS = ("vocab_size", "bos_token_id", "eos_token_id", "pad_token_id")


def on_gpu(config: TrainConfig, steps: int, **trainer: Any) -> TrainConfig:
    """`config` on one GPU in bf16-mixed, frozen parts in bfloat16, for `steps` steps."""
    return attrs.evolve(
        config,
        model=attrs.evolve(config.model, frozen_dtype="bfloat16"),
        trainer=attrs.evolve(
            config.trainer,
            accelerator="gpu",
            devices=1,
            precision="bf16-mixed",
            max_steps=steps,
            log_every_n_steps=1,
            **trainer,
        ),
    )


def tiny_runs(out: Path, steps: int) -> None:
    for family in FAMILY_NAMES:
        config = on_gpu(demo_config(out / family, family, steps=steps, samples=24), steps)
        start = time.perf_counter()
        trainer, _ = fit(config, enable_progress_bar=False)
        loss = float(trainer.callback_metrics["train/loss"])
        print(
            f"tiny {family}: {trainer.global_step} steps in {time.perf_counter() - start:.1f} s, "
            f"last loss {loss:.4f}"
        )
        assert trainer.global_step == steps, f"tiny {family} stopped at {trainer.global_step}"


def fullsize_base(
    tiny: Path, family_name: str = "sdxl", dtype: torch.dtype = torch.bfloat16
) -> BaseModel:
    """Real-size networks of a family with random weights, built in `dtype` on the GPU and
    frozen.

    The tokenizers come from the tiny model folder, so the text encoders must take their ids:
    each is built at full size with the tiny tokenizer's vocabulary and special ids (CLIP pools
    at the end-of-text id; a wrong one would read the pooled embedding from the wrong token).
    """
    family = family_by_name(family_name)
    # The UNet and VAE as shipped; the text encoders built here replace the full-vocabulary ones.
    parts = build_fullsize(family_name, device="cuda", dtype=dtype, with_controlnet=False)
    encoders = tuple(text_encoder(tiny, family_name, part, dtype) for part in family.text_encoders)
    for part in (parts.unet, parts.vae, *encoders):
        part.requires_grad_(False)
        part.eval()
    return BaseModel(
        family=family,
        source=str(tiny),
        unet=parts.unet,
        vae=parts.vae,
        text_encoders=encoders,
        tokenizers=tuple(load_tokenizer(tiny, sub) for sub in family.tokenizers),
        scheduler=load_scheduler(tiny, "scheduler"),
    )


def text_encoder(tiny: Path, family: str, part: str, dtype: torch.dtype) -> TextEncoder:
    ids = json.loads((tiny / part / "config.json").read_text())
    config = {**load_arch_config(family, part), **{key: ids[key] for key in _TOKEN_IDS}}
    with torch.device("cuda"):
        encoder = text_encoder_class(config)(CLIPTextConfig.from_dict(config))
    module: torch.nn.Module = encoder  # transformers' `to` wrapper is not callable for mypy
    module.to(dtype)
    return encoder


class StepTimer(AfterBatch):
    """Wall time at the end of every training batch (synchronised: the GPU work is done)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    @override
    def after_batch(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any
    ) -> None:
        torch.cuda.synchronize()
        self.times.append(time.perf_counter())


def fullsize_run(out: Path, steps: int, batch_size: int) -> None:
    base_config = demo_config(out, "sdxl", steps=steps, samples=4)  # writes the tiny folder
    manifest = write_fill_dataset(out / "dataset-1024", batch_size * steps, sizes=((1024, 1024),))
    deepspeed = importlib.util.find_spec("deepspeed") is not None
    if not deepspeed:
        print("DeepSpeed is not importable: full-size SDXL runs on a single device without it")
    config = on_gpu(base_config, steps, strategy="deepspeed" if deepspeed else "auto")
    config = attrs.evolve(
        config,
        run_dir=out / "run-1024",
        data=attrs.evolve(
            config.data,
            source=SourceConfig(manifest),
            buckets=BucketConfig(area=1024 * 1024),
            batch_size=batch_size,
            num_workers=2,
        ),
        # As examples/sdxl.yaml: activations at 1024 px dominate memory.
        controlnet=attrs.evolve(config.controlnet, gradient_checkpointing=True),
        validation=attrs.evolve(config.validation, prompts=(), images=()),
    )
    L.seed_everything(config.seed, verbose=False)
    # `fit` loads its base model from the config; a random full-size one goes in by hand. On
    # the GPU: `from_unet` builds the 1.25-billion-parameter ControlNet where it is created.
    with torch.device("cuda"):
        module = ControlNetModule(config, base=fullsize_base(Path(config.model.source)))
    timer = StepTimer()
    # No checkpoints, exports or validation: gigabytes of writes are not what this measures.
    trainer = build_trainer(
        config,
        callbacks=[NonFiniteGuard(1), EMACallback(config.ema.config), DataProgress(), timer],
        enable_checkpointing=False,
        logger=False,
        enable_progress_bar=False,
    )
    torch.cuda.reset_peak_memory_stats()
    trainer.fit(module, datamodule=ControlNetDataModule(config))
    assert trainer.global_step == steps, f"full-size SDXL stopped at {trainer.global_step}"
    # The first two steps include start-up (allocator growth, DeepSpeed buckets): skip them.
    timed = timer.times[2:]
    rate = batch_size * (len(timed) - 1) / (timed[-1] - timed[0]) if len(timed) > 1 else 0.0
    peak = torch.cuda.max_memory_allocated() / 2**30
    strategy = "DeepSpeed ZeRO-2" if deepspeed else "single device"
    print(
        f"full-size SDXL ControlNet, 1024x1024, batch {batch_size}, {strategy}: "
        f"{rate:.2f} samples/s, peak GPU memory {peak:.1f} GiB, "
        f"last loss {float(trainer.callback_metrics['train/loss']):.4f}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6, help="training steps per run (>= 4)")
    parser.add_argument("--batch-size", type=int, default=2, help="full-size SDXL batch")
    parser.add_argument("--skip-fullsize", action="store_true", help="tiny models only")
    args = parser.parse_args()
    if args.steps < 4:
        parser.error("--steps must be at least 4 (two warm-up steps, then timed ones)")
    if not torch.cuda.is_available():
        print(
            f"gpu_smoke: no CUDA device (torch {torch.__version__}, CUDA build "
            f"{torch.version.cuda}); nothing to do"
        )
        return 0
    print(f"gpu_smoke on {torch.cuda.get_device_name()}")
    with tempfile.TemporaryDirectory(prefix="cnet-gpu-smoke-") as tmp:
        tiny_runs(Path(tmp) / "tiny", args.steps)
        if not args.skip_fullsize:
            fullsize_run(Path(tmp) / "fullsize", args.steps, args.batch_size)
    print("gpu_smoke: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
