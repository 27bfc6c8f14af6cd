"""The logger a user picks: TensorBoard by default, CSV, wandb and MLflow (optional extras,
offline where asked), the same scalars and images in each."""

from __future__ import annotations

import csv
import itertools
import json
import logging
import math
import os
import sys
import time
import types
from collections.abc import Callable, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import attrs
import lightning as L
import numpy as np
import pytest
from lightning.pytorch.loggers import CSVLogger, MLFlowLogger, TensorBoardLogger, WandbLogger
from lightning.pytorch.loggers import mlflow as lightning_mlflow
from lightning.pytorch.loggers import wandb as lightning_wandb
from PIL import Image

from cnet_data.errors import describe
from cnet_train.config import CheckpointConfig, TrainConfig, ValidationConfig
from cnet_train.config_io import ConfigError, config_from_dict, config_to_dict
from cnet_train.loggers import LoggerConfig, LoggerUnavailableError, build_logger, log_image
from cnet_train.trainer import fit

MakeConfig = Callable[..., TrainConfig]
QUIET: dict[str, Any] = {"enable_progress_bar": False}


def _image() -> Image.Image:
    pixels = np.random.default_rng(0).integers(0, 255, (24, 40, 3), np.uint8)
    return Image.fromarray(pixels)


def _trainer_with(*loggers: object) -> L.Trainer:
    """What `log_image` reads of a trainer: its loggers, and whether it is rank 0."""
    return cast(L.Trainer, SimpleNamespace(loggers=list(loggers), is_global_zero=True))


def _with_logger(config: TrainConfig, **settings: Any) -> TrainConfig:
    return attrs.evolve(config, logger=LoggerConfig(**settings))


def test_csv_logger_writes_the_training_loss(make_config: MakeConfig) -> None:
    config = make_config(
        "sd15", steps=4, trainer_log_every_n_steps=1, validation=ValidationConfig()
    )
    trainer, _ = fit(_with_logger(config, name="csv"), **QUIET)
    assert isinstance(trainer.logger, CSVLogger)
    metrics = config.run_dir / "logs" / "csv" / "metrics.csv"
    with metrics.open(newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r.get("train/loss")]
    logged = [float(r["train/loss"]) for r in rows]
    assert len(logged) == 4 and all(math.isfinite(v) for v in logged)
    # The same numbers the loss history records, step for step.
    history = [
        float(line.split(",")[1])
        for line in (config.run_dir / "loss.csv").read_text().splitlines()
        if line[0].isdigit()
    ]
    np.testing.assert_allclose(logged, history, rtol=1e-5)


def test_csv_logger_keeps_images_beside_its_metrics(tmp_path: Path) -> None:
    logger = CSVLogger(save_dir=str(tmp_path), name="logs", version="csv")
    log_image(_trainer_with(logger), "validation", _image(), 12)
    saved = tmp_path / "logs" / "csv" / "images" / "validation" / "step-00000012.png"
    np.testing.assert_array_equal(np.asarray(Image.open(saved)), np.asarray(_image()))


def test_tensorboard_is_the_default_and_gets_images(make_config: MakeConfig) -> None:
    from tensorboard.backend.event_processing.event_accumulator import (  # type: ignore[import-untyped]
        EventAccumulator,
    )

    config = make_config("sd15")
    assert config.logger == LoggerConfig()
    logger = build_logger(config)
    assert isinstance(logger, TensorBoardLogger)
    assert Path(logger.log_dir) == config.run_dir / "logs"  # where it always wrote
    log_image(_trainer_with(logger), "validation", _image(), 3)
    logger.experiment.flush()
    events = EventAccumulator(str(config.run_dir / "logs"))
    events.Reload()
    (shown,) = events.Images("validation")
    assert (shown.step, shown.width, shown.height) == (3, 40, 24)


def test_only_rank_zero_logs_images(tmp_path: Path) -> None:
    logger = CSVLogger(save_dir=str(tmp_path), name="logs", version="csv")
    other = cast(L.Trainer, SimpleNamespace(loggers=[logger], is_global_zero=False))
    log_image(other, "validation", _image(), 1)
    assert not (tmp_path / "logs").exists()


@pytest.mark.parametrize(
    ("name", "module"), [("wandb", lightning_wandb), ("mlflow", lightning_mlflow)]
)
def test_a_missing_extra_is_one_line_with_the_pip_command(
    make_config: MakeConfig, monkeypatch: pytest.MonkeyPatch, name: str, module: Any
) -> None:
    # As Lightning sees a package that is not installed (whether or not it is, here).
    monkeypatch.setattr(module, f"_{name.upper()}_AVAILABLE", False)
    config = _with_logger(make_config("sd15"), name=name)
    with pytest.raises(LoggerUnavailableError) as caught:
        build_logger(config)
    message, hint, code = describe(caught.value)
    assert "\n" not in message and name in message and code == 1
    assert hint.startswith(f"pip install 'cnet-train[{name}]'")


def test_the_logger_is_chosen_in_the_config_file(make_config: MakeConfig) -> None:
    data = config_to_dict(make_config("sd15"))
    assert data["logger"]["name"] == "tensorboard"
    data["logger"] = {"name": "csv"}
    assert config_from_dict(data).logger == LoggerConfig(name="csv")
    data["logger"] = {"name": "comet"}
    with pytest.raises(ConfigError, match=r"logger\.name"):
        config_from_dict(data)


def test_offline_mlflow_with_a_server_is_refused() -> None:
    with pytest.raises(ValueError, match="offline"):
        LoggerConfig(name="mlflow", offline=True, tracking_uri="http://tracking:5000")


# -- wandb and MLflow, faked: neither is a test dependency ---------------------------------------


_RUN_IDS = itertools.count()


class _FakeRun:
    def __init__(self, **init: Any) -> None:
        self.init = init
        self.logged: list[dict[str, Any]] = []
        # wandb's id: the one asked for (continuing a run), else a new one.
        self.id = init.get("id") or f"wandb-run-{next(_RUN_IDS)}"

    def log(self, data: dict[str, Any]) -> None:
        self.logged.append(data)


@pytest.fixture
def fake_wandb(monkeypatch: pytest.MonkeyPatch) -> list[_FakeRun]:
    """A `wandb` with what Lightning's WandbLogger touches; returns the runs `init` made."""
    runs: list[_FakeRun] = []

    def init(**kwargs: Any) -> _FakeRun:
        runs.append(_FakeRun(**kwargs, mode=os.environ.get("WANDB_MODE")))
        return runs[-1]

    modules = {name: types.ModuleType(name) for name in ("wandb", "wandb.sdk", "wandb.sdk.lib")}
    modules["wandb.wandb_run"] = types.ModuleType("wandb.wandb_run")
    attributes: dict[str, dict[str, Any]] = {
        "wandb": {"init": init, "run": None, "Image": lambda image, **_: ("Image", image)},
        "wandb.sdk.lib": {"RunDisabled": type("RunDisabled", (), {})},
        "wandb.wandb_run": {"Run": _FakeRun},
    }
    for name, module in modules.items():
        for key, value in attributes.get(name, {}).items():
            setattr(module, key, value)
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(lightning_wandb, "_WANDB_AVAILABLE", True)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    return runs


@pytest.mark.parametrize("how", ["config", "environment", "online"])
def test_wandb_is_offline_when_asked(
    make_config: MakeConfig,
    monkeypatch: pytest.MonkeyPatch,
    fake_wandb: list[_FakeRun],
    how: str,
) -> None:
    if how == "environment":
        monkeypatch.setenv("WANDB_MODE", "offline")
    config = _with_logger(make_config("sd15"), name="wandb", project="p", offline=how == "config")
    logger = build_logger(config)
    assert isinstance(logger, WandbLogger)
    assert logger.experiment is fake_wandb[0]  # the run starts when first used
    init = fake_wandb[0].init
    assert (init["project"], init["name"]) == ("p", config.run_dir.name)
    assert init["dir"] == str(config.run_dir / "logs")
    # What Lightning sets for an offline WandbLogger, whichever way offline was asked for.
    assert init["mode"] == (None if how == "online" else "dryrun")


def test_wandb_gets_the_images(fake_wandb: list[_FakeRun]) -> None:
    run = _FakeRun()
    logger = WandbLogger(experiment=run)
    image = _image()
    log_image(_trainer_with(logger), "validation", image, 7)
    (logged,) = run.logged
    assert logged["trainer/global_step"] == 7
    assert logged["validation"] == [("Image", image)]


class _FakeMlflowClient:
    def __init__(self, tracking_uri: str | None = None) -> None:
        self.tracking_uri = tracking_uri
        self.images: list[tuple[str, Image.Image, str]] = []
        self.batches: list[tuple[str, list[Any]]] = []

    def log_batch(self, run_id: str, metrics: Sequence[Any] = (), **_: Any) -> None:
        self.batches.append((run_id, list(metrics)))

    def log_image(self, run_id: str, image: Image.Image, artifact_file: str) -> None:
        self.images.append((run_id, image, artifact_file))


@pytest.fixture
def fake_mlflow(monkeypatch: pytest.MonkeyPatch) -> None:
    stub, tracking = types.ModuleType("mlflow"), types.ModuleType("mlflow.tracking")
    entities = types.ModuleType("mlflow.entities")
    tracking.MlflowClient = _FakeMlflowClient  # type: ignore[attr-defined]
    entities.Metric = SimpleNamespace  # type: ignore[attr-defined]
    stub.tracking, stub.entities = tracking, entities  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "mlflow", stub)
    monkeypatch.setitem(sys.modules, "mlflow.tracking", tracking)
    monkeypatch.setitem(sys.modules, "mlflow.entities", entities)
    monkeypatch.setattr(lightning_mlflow, "_MLFLOW_AVAILABLE", True)


@pytest.mark.usefixtures("fake_mlflow")
@pytest.mark.parametrize(
    ("settings", "env", "server"),
    [
        ({}, None, None),  # the run's own file store
        ({}, "http://env:5000", "http://env:5000"),
        ({"offline": True}, "http://env:5000", None),  # offline wins over the environment
        ({"tracking_uri": "http://named:5000"}, "http://env:5000", "http://named:5000"),
    ],
)
def test_mlflow_tracks_locally_unless_a_server_is_named(
    make_config: MakeConfig,
    monkeypatch: pytest.MonkeyPatch,
    settings: dict[str, Any],
    env: str | None,
    server: str | None,
) -> None:
    if env is None:
        monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    else:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", env)
    config = _with_logger(make_config("sd15"), name="mlflow", project="exp", **settings)
    logger = build_logger(config)
    assert isinstance(logger, MLFlowLogger)
    client = logger._mlflow_client
    assert isinstance(client, _FakeMlflowClient)
    store = f"file:{(config.run_dir / 'logs' / 'mlruns').resolve()}"
    assert client.tracking_uri == (server or store)
    assert (logger._experiment_name, logger._run_name) == ("exp", config.run_dir.name)


@pytest.mark.usefixtures("fake_mlflow")
def test_mlflow_gets_the_images(tmp_path: Path) -> None:
    logger = MLFlowLogger(tracking_uri=f"file:{tmp_path}", run_id="run-1")
    logger._initialized = True  # as after Lightning has started the run
    image = _image()
    log_image(_trainer_with(logger), "validation", image, 5)
    client = logger.experiment
    assert isinstance(client, _FakeMlflowClient)
    assert client.images == [("run-1", image, "validation/step-00000005.png")]


# -- a relaunch continues the same wandb or MLflow run -------------------------------------------

RESUMED = Path("checkpoints/step-00000002.ckpt")
"""A checkpoint to resume from: `build_logger` only needs to know that there is one."""


def _record_file(config: TrainConfig) -> Path:
    return config.run_dir / "logs" / "run_id.json"


def _record(config: TrainConfig) -> dict[str, Any]:
    return cast(dict[str, Any], json.loads(_record_file(config).read_text()))


def _steps(run: _FakeRun) -> list[int]:
    return [logged["trainer/global_step"] for logged in run.logged if "train/loss" in logged]


def _wandb_config(make_config: MakeConfig, **settings: Any) -> TrainConfig:
    return _with_logger(make_config("sd15"), name="wandb", project="p", **settings)


def test_a_first_wandb_launch_records_its_run(
    make_config: MakeConfig, fake_wandb: list[_FakeRun]
) -> None:
    config = _wandb_config(make_config)
    logger = build_logger(config)
    assert not _record_file(config).exists()  # no run yet, so no id to record
    logger.log_metrics({"train/loss": 0.5}, step=3)
    (run,) = fake_wandb
    wanted = {"logger": "wandb", "project": "p", "server": None, "id": run.id, "last_step": 3}
    assert _record(config) == wanted
    logger.log_metrics({"train/loss": 0.4}, step=7)
    assert _record(config) == {**wanted, "last_step": 7}


def test_a_resumed_wandb_launch_continues_the_run_past_its_logged_steps(
    make_config: MakeConfig, fake_wandb: list[_FakeRun]
) -> None:
    config = _wandb_config(make_config)
    first = build_logger(config)
    for step in (1, 2, 3, 4):
        first.log_metrics({"train/loss": 1 / step}, step=step)
    # Killed after logging step 4; relaunched from the checkpoint of step 2, it trains 3 and 4
    # again, with the same draws.
    again = build_logger(config, RESUMED)
    for step in (3, 4, 5, 6):
        again.log_metrics({"train/loss": 1 / step}, step=step)
    old, new = fake_wandb
    assert (new.init["id"], new.init["resume"]) == (old.id, "allow")
    assert (_steps(old), _steps(new)) == ([1, 2, 3, 4], [5, 6])  # each step once, in order
    assert (_record(config)["id"], _record(config)["last_step"]) == (old.id, 6)


def test_a_fresh_wandb_launch_starts_a_new_run(
    make_config: MakeConfig, fake_wandb: list[_FakeRun]
) -> None:
    config = _wandb_config(make_config)
    build_logger(config).log_metrics({"train/loss": 0.5}, step=4)
    fresh = build_logger(config)  # `resume: none`, or no checkpoint to resume from
    assert not _record_file(config).exists()  # the earlier run is forgotten at once
    fresh.log_metrics({"train/loss": 0.6}, step=1)
    old, new = fake_wandb
    assert new.init["id"] is None and new.id != old.id
    assert _steps(new) == [1]
    assert (_record(config)["id"], _record(config)["last_step"]) == (new.id, 1)


def _written_record(config: TrainConfig, text: str) -> None:
    _record_file(config).parent.mkdir(parents=True, exist_ok=True)
    _record_file(config).write_text(text)


def _a_record(**changes: Any) -> str:
    record = {"logger": "wandb", "project": "p", "server": None, "id": "old-run", "last_step": 9}
    return json.dumps({**record, **changes})


@pytest.mark.usefixtures("fake_mlflow")
@pytest.mark.parametrize(
    ("record", "settings", "notice"),
    [
        (_a_record(project="q"), {"name": "wandb"}, "records a wandb project 'q' run, not wandb"),
        (_a_record(logger="mlflow"), {"name": "wandb"}, "records a mlflow project 'p' run"),
        (
            _a_record(logger="mlflow"),
            {"name": "mlflow", "tracking_uri": "http://named:5000"},
            "not mlflow project 'p' at http://named:5000",
        ),
        ('{"logger": "wandb", "id": ', {"name": "wandb"}, "is not a run record"),
        (_a_record(id=""), {"name": "mlflow"}, "is not a run record"),
    ],
)
def test_a_record_of_another_run_is_ignored_with_a_notice(
    make_config: MakeConfig,
    fake_wandb: list[_FakeRun],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    record: str,
    settings: dict[str, Any],
    notice: str,
) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    config = _with_logger(make_config("sd15"), project="p", **settings)
    _written_record(config, record)
    with caplog.at_level(logging.WARNING, logger="cnet_train.logger_resume"):
        logger = build_logger(config, RESUMED)
    (line,) = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert notice in line and "\n" not in line and line.endswith("starting a new run")
    assert logger.version is None if settings["name"] == "wandb" else logger._run_id is None  # type: ignore[attr-defined]


@pytest.mark.usefixtures("fake_mlflow")
def test_mlflow_records_its_run_and_a_relaunch_continues_it(
    make_config: MakeConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    config = _with_logger(make_config("sd15"), name="mlflow", project="exp")
    first = build_logger(config)
    assert isinstance(first, MLFlowLogger) and first._run_id is None
    first._run_id, first._initialized = "mlflow-run-1", True  # as Lightning starts the run
    first.log_metrics({"train/loss": 0.5}, step=4)
    wanted = {"logger": "mlflow", "project": "exp", "server": None, "id": "mlflow-run-1"}
    assert _record(config) == {**wanted, "last_step": 4}
    again = build_logger(config, RESUMED)
    assert isinstance(again, MLFlowLogger) and again._run_id == "mlflow-run-1"
    again._initialized = True
    for step in (3, 4, 5):
        again.log_metrics({"train/loss": 1 / step}, step=step)
    client = again.experiment
    assert isinstance(client, _FakeMlflowClient)
    logged = [(run_id, [metric.step for metric in metrics]) for run_id, metrics in client.batches]
    assert logged == [("mlflow-run-1", [5])]
    assert _record(config) == {**wanted, "last_step": 5}


def test_a_failed_record_write_leaves_the_old_record_whole(
    make_config: MakeConfig, fake_wandb: list[_FakeRun], monkeypatch: pytest.MonkeyPatch
) -> None:
    config = _wandb_config(make_config)
    logger = build_logger(config)
    logger.log_metrics({"train/loss": 0.5}, step=1)
    before = _record_file(config).read_bytes()
    fsync = os.fsync

    def disk_full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space"):
        logger.log_metrics({"train/loss": 0.4}, step=2)
    monkeypatch.setattr(os, "fsync", fsync)
    assert _record_file(config).read_bytes() == before
    assert [p.name for p in _record_file(config).parent.iterdir()] == ["run_id.json"]  # no temp


def test_only_rank_zero_writes_the_record(
    make_config: MakeConfig, fake_wandb: list[_FakeRun], monkeypatch: pytest.MonkeyPatch
) -> None:
    from lightning.pytorch.utilities import rank_zero_only

    config = _wandb_config(make_config)
    _written_record(config, _a_record())
    monkeypatch.setattr(rank_zero_only, "rank", 1)
    logger = build_logger(config, RESUMED)
    assert logger.version == "old-run"  # every rank knows the id; none but rank 0 uses it
    logger.log_metrics({"train/loss": 0.5}, step=12)
    assert not fake_wandb  # no run started on this rank
    assert json.loads(_record_file(config).read_text())["last_step"] == 9


def test_a_relaunch_continues_the_wandb_run_end_to_end(
    make_config: MakeConfig, fake_wandb: list[_FakeRun]
) -> None:
    config = make_config(
        "sd15",
        steps=6,
        trainer_log_every_n_steps=1,
        validation=ValidationConfig(),
        checkpoint=CheckpointConfig(every_n_steps=2, keep_last=3, resume="auto"),
    )
    config = _with_logger(config, name="wandb", project="p")
    fit(config, max_steps=4, **QUIET)
    # As if killed after logging step 4, before its checkpoint was written.
    (config.run_dir / "checkpoints" / "step-00000004.ckpt").unlink()
    fit(config, **QUIET)  # `resume: auto` takes step 2
    first, second = fake_wandb
    assert (second.init["id"], second.init["resume"]) == (first.id, "allow")
    before, after = _steps(first), _steps(second)
    assert before and after and min(after) > max(before)
    assert before + after == list(range(before[0], after[-1] + 1))  # every step once, in order
    assert _record(config) == {
        "logger": "wandb",
        "project": "p",
        "server": None,
        "id": first.id,
        "last_step": after[-1],
    }


def test_a_resumed_tensorboard_run_shows_each_step_once(make_config: MakeConfig) -> None:
    from tensorboard.backend.event_processing.event_accumulator import (
        EventAccumulator,
    )

    config = make_config("sd15")
    first = build_logger(config)
    for step in (1, 2, 3, 4):
        first.log_metrics({"train/loss": float(step)}, step=step)
    first.finalize("success")
    # TensorBoard reads a run's event files in name order; a name starts with the second it
    # was created in, then a per-process counter compared as text ("10" < "9"). A relaunch is
    # a later second, so wait for one: in the same second a long test session can misorder.
    time.sleep(1.05)
    again = build_logger(config, RESUMED)  # trains steps 3 and 4 again
    for step in (3, 4, 5):
        again.log_metrics({"train/loss": 10.0 * step}, step=step)
    again.finalize("success")
    events = EventAccumulator(str(config.run_dir / "logs"))
    events.Reload()
    shown = [(e.step, e.value) for e in events.Scalars("train/loss")]
    assert shown == [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0), (5, 50.0)]
