"""From a `TrainConfig` to a configured Lightning `Trainer`, and the training run itself."""

from __future__ import annotations

import logging
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import LearningRateMonitor

from cnet_models.loading import BaseModel
from cnet_train.callbacks.control_gain import ControlGainCallback
from cnet_train.callbacks.data_progress import DataProgress
from cnet_train.callbacks.ema import EMACallback
from cnet_train.callbacks.export import ExportCallback
from cnet_train.callbacks.guard import NonFiniteGuard
from cnet_train.callbacks.history import LossHistory
from cnet_train.callbacks.progress import StepProgressBar
from cnet_train.callbacks.throughput import ThroughputLogger
from cnet_train.callbacks.validation import ValidationCallback
from cnet_train.checkpointing import CheckpointCallback, DurableCheckpointIO
from cnet_train.config import TrainConfig
from cnet_train.config_io import write_resolved_config
from cnet_train.data import ControlNetDataModule, run_buckets
from cnet_train.errors import PreemptedError, RankFailedError
from cnet_train.finishing import resume_finishes_the_run
from cnet_train.loggers import build_logger
from cnet_train.memory_launch import auto_off, check_at_launch
from cnet_train.module import ControlNetModule
from cnet_train.precision_auto import as_recorded, settle_here
from cnet_train.quiet import silence_expected_notices
from cnet_train.resume import ResumeAgreement, checkpoint_dir, resume_path
from cnet_train.strategies import build_strategy, lightning_precision
from cnet_train.summary import RunSummary

logger = logging.getLogger(__name__)

__all__ = [
    "RankFailedError",
    "build_callbacks",
    "build_trainer",
    "check_local_ranks",
    "checkpoint_dir",
    "fit",
    "resume_path",
]


def build_callbacks(config: TrainConfig, resume_from: Path | None = None) -> list[L.Callback]:
    """The run's callbacks, in the order their end-of-training work must happen: the finiteness
    check, then the export, validation and loss history, and the final checkpoint last (a
    relaunch after a kill in between resumes at the last step and does what is missing).

    The callbacks that need another one are handed it here (the guard, the EMA), rather than
    finding it among the trainer's callbacks by class."""
    every = config.trainer.log_every_n_steps
    guard = NonFiniteGuard(every)
    ema = EMACallback(config.ema.config) if config.ema.enabled else None
    callbacks: list[L.Callback] = [
        ResumeAgreement(resume_from),
        DataProgress(),
        guard,
        ThroughputLogger(every),
        LearningRateMonitor(logging_interval="step"),
    ]
    if ema is not None:
        callbacks.append(ema)
    callbacks.append(ExportCallback(config.run_dir, config.export, ema=ema, guard=guard))
    buckets = run_buckets(config).config  # validation's default sizes follow the training's
    callbacks.append(ValidationCallback(config.run_dir, config.validation, buckets))
    callbacks.append(ControlGainCallback(config))
    callbacks.append(LossHistory(config.run_dir, read_every_n_steps=every))
    callbacks.append(RunSummary(config))  # prints; its end summary comes in on_fit_end
    callbacks.append(CheckpointCallback(checkpoint_dir(config), config.checkpoint, guard=guard))
    return callbacks


def build_trainer(
    config: TrainConfig,
    callbacks_extra: Sequence[L.Callback] = (),
    *,
    resume_from: Path | None = None,
    **overrides: Any,
) -> L.Trainer:
    """A Trainer as `config` says; `overrides` replace Trainer arguments (tests, tools).

    The progress bar is cnet's step bar unless `enable_progress_bar=False` is given."""
    t = config.trainer
    silence_expected_notices()
    progress: list[L.Callback] = (
        [StepProgressBar(loss_every_n_steps=t.log_every_n_steps)]
        if overrides.get("enable_progress_bar", True)
        else []
    )
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
        "callbacks": [*build_callbacks(config, resume_from), *callbacks_extra, *progress],
        "plugins": [DurableCheckpointIO()],
        # cnet's CheckpointCallback writes every checkpoint; Lightning's would write its own.
        "enable_checkpointing": False,
        # Resuming, a wandb or MLflow logger continues the run an earlier launch recorded.
        "logger": build_logger(config, resume_from),
        "default_root_dir": str(config.run_dir),
        # The bucket sampler is rank-aware by itself; Lightning must not wrap it.
        "use_distributed_sampler": False,
        "num_sanity_val_steps": 0,
        "enable_model_summary": False,
    }
    options.update(overrides)
    trainer = L.Trainer(**options)
    resume_finishes_the_run(trainer)
    return trainer


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
    # Before anything is written or loaded. A resumed run keeps the dtypes it trained in; a
    # `base` built in memory names its own, and has no config to plan from.
    ckpt = resume_path(config)
    config = as_recorded(config, ckpt)
    config = settle_here(config, frozen=None if base is None else base.unet.dtype)
    config = check_at_launch(config) if base is None else auto_off(config)
    L.seed_everything(config.seed, workers=True, verbose=False)
    config.run_dir.mkdir(parents=True, exist_ok=True)
    trainer = build_trainer(config, callbacks_extra, resume_from=ckpt, **trainer_overrides)
    if trainer.is_global_zero:
        write_resolved_config(config, config.run_dir)
    module = ControlNetModule(config, base)
    data = ControlNetDataModule(config)
    if ckpt is not None:
        logger.info("resuming from %s", ckpt)
    try:
        # A checkpoint file (single device, DDP) holds only tensors and plain data: it loads
        # with weights_only. DeepSpeed and FSDP2 folders are read by their own loaders.
        safe_load = True if ckpt is not None and ckpt.is_file() else None
        trainer.fit(
            module,
            datamodule=data,
            ckpt_path=str(ckpt) if ckpt else None,
            weights_only=safe_load,
        )
    except PreemptedError as stopped:
        # Every rank stopped at the same step with the same signal: they exit with its code.
        check_local_ranks(trainer, expected_code=stopped.exit_code)
        raise
    check_local_ranks(trainer)
    return trainer, module


RANK_EXIT_TIMEOUT_S = 300
"""How long the main process waits for the other local ranks once its own run is over."""


def check_local_ranks(trainer: L.Trainer, expected_code: int = 0) -> None:
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
        if code != expected_code:
            failed.append(f"local rank {local_rank} exited with code {code}")
    if failed:
        raise RankFailedError(
            "; ".join(failed),
            hint="that rank's own error is in the output above; fix it and relaunch to resume",
        )
