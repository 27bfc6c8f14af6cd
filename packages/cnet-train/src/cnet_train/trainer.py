"""From a `TrainConfig` to a configured Lightning `Trainer`, and the training run itself."""

from __future__ import annotations

import logging
import re
import subprocess
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger

from cnet_models.loading import BaseModel
from cnet_train.callbacks.ema import EMACallback
from cnet_train.callbacks.export import ExportCallback
from cnet_train.callbacks.guard import NonFiniteGuard
from cnet_train.callbacks.history import LossHistory
from cnet_train.callbacks.throughput import ThroughputLogger
from cnet_train.callbacks.validation import ValidationCallback
from cnet_train.config import TrainConfig
from cnet_train.config_io import write_resolved_config
from cnet_train.data import ControlNetDataModule
from cnet_train.module import ControlNetModule
from cnet_train.strategies import build_strategy, lightning_precision

logger = logging.getLogger(__name__)

CHECKPOINT_PATTERN = re.compile(r"step-(\d{8})\.ckpt")


def checkpoint_dir(config: TrainConfig) -> Path:
    return config.run_dir / "checkpoints"


def build_callbacks(config: TrainConfig) -> list[L.Callback]:
    every = config.trainer.log_every_n_steps
    callbacks: list[L.Callback] = [
        NonFiniteGuard(every),
        ThroughputLogger(every),
        LearningRateMonitor(logging_interval="step"),
    ]
    if config.ema.enabled:
        callbacks.append(EMACallback(config.ema.config))
    callbacks.append(ExportCallback(config.run_dir, config.export))
    callbacks.append(ValidationCallback(config.run_dir, config.validation))
    callbacks.append(LossHistory(config.run_dir))
    callbacks.append(
        ModelCheckpoint(
            dirpath=checkpoint_dir(config),
            filename="step-{step:08d}",
            auto_insert_metric_name=False,
            every_n_train_steps=config.checkpoint.every_n_steps or None,
            save_top_k=config.checkpoint.keep_last,
            monitor="step",
            mode="max",
            save_on_train_epoch_end=False,
        )
    )
    return callbacks


def build_trainer(
    config: TrainConfig, callbacks_extra: Sequence[L.Callback] = (), **overrides: Any
) -> L.Trainer:
    """A Trainer as `config` says; `overrides` replace Trainer arguments (tests, tools)."""
    t = config.trainer
    options: dict[str, Any] = {
        "max_steps": t.max_steps,
        "max_epochs": -1,
        "accelerator": t.accelerator,
        "devices": t.devices,
        "num_nodes": t.num_nodes,
        "strategy": build_strategy(t),
        "precision": lightning_precision(t),
        "accumulate_grad_batches": t.accumulate_grad_batches,
        "gradient_clip_val": t.gradient_clip_val,
        "log_every_n_steps": t.log_every_n_steps,
        "callbacks": [*build_callbacks(config), *callbacks_extra],
        "logger": TensorBoardLogger(save_dir=str(config.run_dir), name="logs", version=""),
        "default_root_dir": str(config.run_dir),
        # The bucket sampler is rank-aware by itself; Lightning must not wrap it.
        "use_distributed_sampler": False,
        "num_sanity_val_steps": 0,
        "enable_model_summary": False,
    }
    options.update(overrides)
    return L.Trainer(**options)


def resume_path(config: TrainConfig) -> Path | None:
    """The checkpoint to resume from: `auto` takes the newest complete one, if any."""
    resume = config.checkpoint.resume
    if resume == "none":
        return None
    if resume != "auto":
        path = Path(resume)
        if not path.exists():
            raise FileNotFoundError(f"checkpoint.resume: {path} does not exist")
        return path
    found = sorted(
        (
            p
            for p in checkpoint_dir(config).glob("step-*.ckpt")
            if CHECKPOINT_PATTERN.fullmatch(p.name)
        ),
        reverse=True,
    )
    for path in found:
        if path.is_dir() or zipfile.is_zipfile(path):  # a torch.save archive that ends whole
            return path
        logger.warning("skipping incomplete checkpoint %s", path)
    return None


def fit(
    config: TrainConfig,
    callbacks_extra: Sequence[L.Callback] = (),
    *,
    base: BaseModel | None = None,
    **trainer_overrides: Any,
) -> tuple[L.Trainer, ControlNetModule]:
    """Train as `config` says; resumes per `checkpoint.resume`. Returns trainer and module.

    `base` replaces loading `config.model` (a model built in memory, e.g. full-size random
    weights for a benchmark)."""
    L.seed_everything(config.seed, workers=True, verbose=False)
    config.run_dir.mkdir(parents=True, exist_ok=True)
    trainer = build_trainer(config, callbacks_extra, **trainer_overrides)
    if trainer.is_global_zero:
        write_resolved_config(config, config.run_dir)
    module = ControlNetModule(config, base)
    data = ControlNetDataModule(config)
    ckpt = resume_path(config)
    if ckpt is not None:
        logger.info("resuming from %s", ckpt)
    trainer.fit(module, datamodule=data, ckpt_path=str(ckpt) if ckpt else None)
    check_local_ranks(trainer)
    return trainer, module


RANK_EXIT_TIMEOUT_S = 300
"""How long the main process waits for the other local ranks once its own run is over."""


class RankFailedError(RuntimeError):
    """Another process of this launch exited with an error."""


def check_local_ranks(trainer: L.Trainer) -> None:
    """Wait for the processes Lightning started beside this one and fail if any failed.

    Lightning's subprocess launcher does not look at its children's exit codes once the main
    process's `fit` returns: a rank that crashed at the end would leave a launch that reports
    success to the scheduler.
    """
    procs: list[subprocess.Popen[bytes]] = getattr(trainer.strategy.launcher, "procs", [])
    failed = []
    for local_rank, proc in enumerate(procs, start=1):
        try:
            code = proc.wait(timeout=RANK_EXIT_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            # Left waiting in a collective that this rank will never enter: end it.
            proc.kill()
            failed.append(
                f"local rank {local_rank} had not exited {RANK_EXIT_TIMEOUT_S} s after "
                "this one finished and was killed"
            )
            continue
        if code != 0:
            failed.append(f"local rank {local_rank} exited with code {code}")
    if failed:
        raise RankFailedError("; ".join(failed) + " (its error is in the output above)")
