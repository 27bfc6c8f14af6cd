"""The experiment logger a user picks (`logger.name`): TensorBoard, CSV, Weights & Biases or
MLflow, each through Lightning's own logger, and images logged to whichever the trainer has.

Every metric reaches the logger through Lightning (`self.log`), so each logger gets the same
scalars; `log_image` gives each the same validation grids. TensorBoard and CSV need nothing
beyond cnet-train; wandb and mlflow are optional extras (`pip install 'cnet-train[wandb]'`),
and a missing one is reported in one line before any model loads. Offline use is the default
where it can be: wandb honours `offline` and `WANDB_MODE=offline`, and MLflow writes to a local
file store under the run directory unless a tracking server is named. A relaunch that resumes
from a checkpoint continues the same wandb or MLflow run (`cnet_train.logger_resume`).

Lightning is imported inside the functions: the config module imports `LoggerConfig`, and
`cnet-train config` must not pay for Lightning.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import attrs
import numpy as np
import torch
from PIL import Image

from cnet_data.errors import CnetError
from cnet_train.plots import save_png

if TYPE_CHECKING:
    import lightning as L
    from lightning.pytorch.loggers import Logger

    from cnet_train.config import TrainConfig
    from cnet_train.logger_resume import RunRecord

LoggerName = Literal["tensorboard", "csv", "wandb", "mlflow"]

LOGS_DIR = "logs"
"""Folder of the run directory that every logger writes under (TensorBoard's events directly)."""


def _non_empty(_: object, attribute: attrs.Attribute[Any], value: str | None) -> None:
    if value is not None and not value:
        raise ValueError("must not be empty")


@attrs.frozen
class LoggerConfig:
    """Where the run's scalars and validation images go."""

    name: LoggerName = "tensorboard"
    """`tensorboard` (RUN_DIR/logs), `csv` (RUN_DIR/logs/csv/metrics.csv, images beside it),
    `wandb` (needs `pip install 'cnet-train[wandb]'`) or `mlflow` (`cnet-train[mlflow]`)."""
    project: str = attrs.field(default="cnet", validator=_non_empty)
    """wandb: the project; mlflow: the experiment name. Unused by TensorBoard and CSV."""
    run_name: str | None = attrs.field(default=None, validator=_non_empty)
    """wandb and mlflow: the run's display name; None: the run directory's name."""
    offline: bool = False
    """wandb: log to RUN_DIR/logs/wandb only, for a later `wandb sync` (also when the
    environment says `WANDB_MODE=offline`); mlflow: the local file store under RUN_DIR/logs,
    whatever MLFLOW_TRACKING_URI says."""
    tracking_uri: str | None = attrs.field(default=None, validator=_non_empty)
    """mlflow: the tracking server, e.g. `http://host:5000`; None: MLFLOW_TRACKING_URI if set,
    else a file store at RUN_DIR/logs/mlruns."""

    def __attrs_post_init__(self) -> None:
        if self.offline and self.tracking_uri and not self.tracking_uri.startswith("file:"):
            raise ValueError(
                f"logger.offline is set but logger.tracking_uri {self.tracking_uri!r} is a "
                "server; drop one of them (offline MLflow writes a file store under the run)"
            )


class LoggerUnavailableError(CnetError):
    """The chosen logger's package (an optional extra) is not installed."""

    def __init__(self, name: str) -> None:
        super().__init__(
            f"logger.name {name} needs the {name} package, which is not installed",
            hint=f"pip install 'cnet-train[{name}]', or pick logger.name tensorboard or csv",
        )


def build_logger(config: TrainConfig, resume_from: Path | None = None) -> Logger:
    """The Lightning logger `config.logger` names, writing under RUN_DIR/logs.

    `resume_from` is the checkpoint this launch resumes from: a wandb or MLflow logger then
    continues the run an earlier launch recorded; None (a fresh start) forgets that record."""
    from cnet_train.logger_resume import continued_run, forget_run

    settings, run_dir = config.logger, config.run_dir
    if resume_from is None:
        forget_run(run_dir)
    if settings.name == "csv":
        return _csv(run_dir)
    if settings.name in ("wandb", "mlflow"):
        continued = continued_run(settings, run_dir, resume_from)
        if settings.name == "wandb":
            return _wandb(settings, run_dir, continued)
        return _mlflow(settings, run_dir, continued)
    return _tensorboard(run_dir, resume_from)


def _tensorboard(run_dir: Path, resume_from: Path | None) -> Logger:
    from lightning.pytorch.loggers import TensorBoardLogger

    from cnet_train.resume import checkpoint_step

    # The steps past the checkpoint were logged by the launch that was killed and are trained
    # again now: TensorBoard shows the new events in their place (it drops the older events
    # from `purge_step` on).
    step = checkpoint_step(resume_from) if resume_from is not None else None
    purge: dict[str, Any] = {} if step is None else {"purge_step": step + 1}
    return TensorBoardLogger(save_dir=str(run_dir), name=LOGS_DIR, version="", **purge)


def _csv(run_dir: Path) -> Logger:
    from lightning.pytorch.loggers import CSVLogger

    # Written at every logged step (every `trainer.log_every_n_steps`), so that a run can be
    # followed as it goes; each write appends only the new rows.
    return CSVLogger(
        save_dir=str(run_dir), name=LOGS_DIR, version="csv", flush_logs_every_n_steps=1
    )


def wandb_offline(settings: LoggerConfig) -> bool:
    """Whether wandb runs offline: the config says so, or the environment does."""
    return settings.offline or os.environ.get("WANDB_MODE", "").lower() in ("offline", "dryrun")


def _wandb(settings: LoggerConfig, run_dir: Path, continued: RunRecord | None) -> Logger:
    from cnet_train.logger_resume import RecordedWandbLogger, RunKey

    save_dir = run_dir / LOGS_DIR
    save_dir.mkdir(parents=True, exist_ok=True)  # wandb refuses a directory that is not there
    try:
        return RecordedWandbLogger(
            run_dir,
            RunKey.of(settings),
            continued,
            name=settings.run_name or run_dir.name,
            save_dir=str(save_dir),
            project=settings.project,
            offline=wandb_offline(settings),
        )
    except ModuleNotFoundError:
        raise LoggerUnavailableError("wandb") from None


def mlflow_server(settings: LoggerConfig) -> str | None:
    """The tracking server named in the config or the environment, unless offline."""
    return settings.tracking_uri or (
        None if settings.offline else os.environ.get("MLFLOW_TRACKING_URI")
    )


def mlflow_tracking_uri(settings: LoggerConfig, run_dir: Path) -> str:
    """The server named in the config or the environment, unless offline; else the run's
    own file store."""
    return mlflow_server(settings) or f"file:{(run_dir / LOGS_DIR / 'mlruns').resolve()}"


def _mlflow(settings: LoggerConfig, run_dir: Path, continued: RunRecord | None) -> Logger:
    from cnet_train.logger_resume import RecordedMLFlowLogger, RunKey

    try:
        return RecordedMLFlowLogger(
            run_dir,
            RunKey.of(settings),
            continued,
            experiment_name=settings.project,
            run_name=settings.run_name or run_dir.name,
            tracking_uri=mlflow_tracking_uri(settings, run_dir),
        )
    except ModuleNotFoundError:
        raise LoggerUnavailableError("mlflow") from None


def log_image(trainer: L.Trainer, key: str, image: Image.Image, step: int) -> None:
    """Log `image` under `key` at `step` to every logger of `trainer` (rank 0 only; loggers
    cnet does not know are left alone). CSV has no image format: the PNG is written beside
    the metrics file, at `images/KEY/step-NNNNNNNN.png`."""
    if not trainer.is_global_zero:
        return
    from lightning.pytorch.loggers import CSVLogger, MLFlowLogger, TensorBoardLogger, WandbLogger

    artifact = f"{key}/step-{step:08d}.png"
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            chw = torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)
            logger.experiment.add_image(key, chw, step)
        elif isinstance(logger, CSVLogger):
            save_png(image, Path(logger.log_dir) / "images" / artifact)
        elif isinstance(logger, WandbLogger):
            logger.log_image(key=key, images=[image], step=step)
        elif isinstance(logger, MLFlowLogger):
            logger.experiment.log_image(logger.run_id, image, artifact)
