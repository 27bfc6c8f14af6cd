"""A relaunch that resumes from a checkpoint continues the same wandb or MLflow run.

TensorBoard and CSV write into RUN_DIR/logs, so a relaunch keeps adding to the same files; a
wandb or MLflow run lives on a server (or in a store) under an id that only the launch that
made it knows. So the logger records its id in RUN_DIR/logs/run_id.json, together with the
newest step it logged, and a relaunch that resumes from a checkpoint hands that id back to
the logger. The record is written atomically, by global rank 0 only (the only rank whose
logger talks to the service: Lightning's `log_metrics` is rank-zero-only), at its first
logged step and whenever the logged step grows.

The steps between the resumed checkpoint and the kill were logged by the killed launch and
are trained again (with the same draws: they are a pure function of seed and step). Logged
again, wandb would draw its curves back to an earlier step and MLflow would hold two points at
each; so a continued run logs only the steps past the newest one the record holds.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs
from lightning.pytorch.loggers import MLFlowLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from typing_extensions import override

from cnet_data.atomic import atomic_write_text
from cnet_train.loggers import LOGS_DIR, LoggerConfig, mlflow_server

logger = logging.getLogger(__name__)

RECORD_NAME = "run_id.json"
CONTINUED = ("wandb", "mlflow")
"""The loggers whose run a relaunch must name to continue; TensorBoard and CSV need no id."""


def record_path(run_dir: Path) -> Path:
    return run_dir / LOGS_DIR / RECORD_NAME


@attrs.frozen
class RunKey:
    """What a recorded run belongs to: a record made under another key names a run the
    logger would not find (or should not add to), so it is not continued."""

    logger: str
    """`logger.name`: wandb or mlflow."""
    project: str
    """wandb: the project; mlflow: the experiment name."""
    server: str | None
    """mlflow: the tracking server named in the config or the environment; None: the run's
    own file store (and always None for wandb, whose server is its login)."""

    @classmethod
    def of(cls, settings: LoggerConfig) -> RunKey:
        server = mlflow_server(settings) if settings.name == "mlflow" else None
        return cls(logger=settings.name, project=settings.project, server=server)

    def describe(self) -> str:
        where = f" at {self.server}" if self.server else ""
        return f"{self.logger} project {self.project!r}{where}"


@attrs.frozen
class RunRecord:
    """The run a launch logged to, as RUN_DIR/logs/run_id.json holds it."""

    key: RunKey
    """Which logger, project and server the run is in."""
    id: str
    """The run's id (wandb's run id, MLflow's run_id)."""
    last_step: int
    """The newest step logged to it; a continuing launch logs only past it."""

    def to_json(self) -> str:
        return json.dumps({**attrs.asdict(self.key), "id": self.id, "last_step": self.last_step})

    @classmethod
    def from_json(cls, text: str) -> RunRecord:
        """The record in `text`; ValueError (or a subclass) when it is not one."""
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("it is not a JSON object")
        if not isinstance(data.get("id"), str) or not data["id"]:
            raise ValueError("its id is not a non-empty string")
        if not isinstance(data.get("last_step"), int):
            raise ValueError("its last_step is not an integer")
        key = RunKey(logger=data["logger"], project=data["project"], server=data["server"])
        return cls(key=key, id=data["id"], last_step=data["last_step"])


def read_record(path: Path) -> RunRecord | None:
    """The record at `path`; None when there is none, or (with a notice) when it is unreadable."""
    try:
        return RunRecord.from_json(path.read_text())
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError) as bad:
        logger.warning("ignoring %s, which is not a run record (%s); starting a new run", path, bad)
        return None


def continued_run(
    settings: LoggerConfig, run_dir: Path, resume_from: Path | None
) -> RunRecord | None:
    """The run this launch continues: the recorded one, when it resumes from a checkpoint and
    the record is for the same logger, project and server (else None, with a notice)."""
    if resume_from is None or settings.name not in CONTINUED:
        return None
    path = record_path(run_dir)
    record = read_record(path)
    wanted = RunKey.of(settings)
    if record is not None and record.key != wanted:
        logger.warning(
            "%s records a %s run, not %s: starting a new run",
            path,
            record.key.describe(),
            wanted.describe(),
        )
        return None
    if record is not None:
        logger.info(
            "continuing %s run %s; steps up to %d are logged there already",
            record.key.logger,
            record.id,
            record.last_step,
        )
    return record


def forget_run(run_dir: Path) -> None:
    """Remove the record of an earlier run: a fresh launch logs to a new one.

    Every rank may call this: all ranks agree that the launch is fresh, and each builds its
    logger before the process group forms, so before rank 0 can have logged (and recorded)
    anything of this launch."""
    with contextlib.suppress(FileNotFoundError):
        record_path(run_dir).unlink()


class RunRecorder:
    """Keeps RUN_DIR/logs/run_id.json up to date for one launch's logger, and says which steps
    a continued run has logged already. Used by rank 0 only (from `log_metrics`)."""

    def __init__(self, run_dir: Path, key: RunKey, continued: RunRecord | None) -> None:
        self.path = record_path(run_dir)
        self.key = key
        self.floor = continued.last_step if continued else -1
        """Steps up to here were logged by an earlier launch; -1 on a fresh run."""
        self.recorded_step: int | None = None
        """The step the record on disk holds for this launch's run; None before its first
        write."""

    def skips(self, step: int | None) -> bool:
        """Whether `step` was logged by the launch that was killed (and is trained again now,
        with the same draws)."""
        return step is not None and step <= self.floor

    def logged(self, step: int | None, run_id: str | None) -> None:
        """Record `run_id` as logged up to `step`, once it is an id and the step is new."""
        newest = max(self.floor, -1 if step is None else step)
        if run_id is None or (self.recorded_step is not None and newest <= self.recorded_step):
            return
        atomic_write_text(self.path, RunRecord(self.key, run_id, newest).to_json())
        self.recorded_step = newest


class RecordedWandbLogger(WandbLogger):
    """Lightning's WandbLogger, recording its run and continuing a recorded one."""

    def __init__(
        self, run_dir: Path, key: RunKey, continued: RunRecord | None, **options: Any
    ) -> None:
        if continued is not None:
            # wandb continues the run with this id, or starts one under it if the server
            # has none (an offline run not synced yet).
            options.update(id=continued.id, resume="allow")
        super().__init__(**options)
        self.cnet_recorder = RunRecorder(run_dir, key, continued)

    @override
    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        if self.cnet_recorder.skips(step):
            return
        super().log_metrics(metrics, step)
        self.cnet_recorder.logged(step, self.version)  # the run exists once it has logged


class RecordedMLFlowLogger(MLFlowLogger):
    """Lightning's MLFlowLogger, recording its run and continuing a recorded one."""

    def __init__(
        self, run_dir: Path, key: RunKey, continued: RunRecord | None, **options: Any
    ) -> None:
        if continued is not None:
            options["run_id"] = continued.id
        super().__init__(**options)
        self.cnet_recorder = RunRecorder(run_dir, key, continued)

    @override
    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        if self.cnet_recorder.skips(step):
            return
        super().log_metrics(metrics, step)
        self.cnet_recorder.logged(step, self.run_id)
