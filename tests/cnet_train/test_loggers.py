"""The logger a user picks: TensorBoard by default, CSV, wandb and MLflow (optional extras,
offline where asked), the same scalars and images in each."""

from __future__ import annotations

import csv
import math
import os
import sys
import types
from collections.abc import Callable
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
from cnet_train.config import TrainConfig, ValidationConfig
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


class _FakeRun:
    def __init__(self, **init: Any) -> None:
        self.init = init
        self.logged: list[dict[str, Any]] = []

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

    def log_image(self, run_id: str, image: Image.Image, artifact_file: str) -> None:
        self.images.append((run_id, image, artifact_file))


@pytest.fixture
def fake_mlflow(monkeypatch: pytest.MonkeyPatch) -> None:
    stub, tracking = types.ModuleType("mlflow"), types.ModuleType("mlflow.tracking")
    tracking.MlflowClient = _FakeMlflowClient  # type: ignore[attr-defined]
    stub.tracking = tracking  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "mlflow", stub)
    monkeypatch.setitem(sys.modules, "mlflow.tracking", tracking)
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
