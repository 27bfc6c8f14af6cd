"""Fixtures for the cnet-train tests: tiny demo runs, written offline."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import pytest

from cnet_train.config import TrainConfig
from cnet_train.demo import demo_config

MakeConfig = Callable[..., TrainConfig]


@pytest.fixture
def make_config(tmp_path: Path) -> MakeConfig:
    """`make_config(family="sd15", steps=4, samples=12, **sections)`: a tiny CPU run's config.

    Keyword arguments replace whole top-level sections, or `trainer_`/`data_` prefixed fields
    of those two sections (e.g. `data_batch_size=2`).
    """

    def make(
        family: str = "sd15", steps: int = 4, samples: int = 12, **changes: Any
    ) -> TrainConfig:
        config = demo_config(tmp_path / family, family, steps=steps, samples=samples)  # type: ignore[arg-type]
        trainer = {
            k.removeprefix("trainer_"): v for k, v in changes.items() if k.startswith("trainer_")
        }
        data = {k.removeprefix("data_"): v for k, v in changes.items() if k.startswith("data_")}
        top = {k: v for k, v in changes.items() if not k.startswith(("trainer_", "data_"))}
        return attrs.evolve(
            config,
            trainer=attrs.evolve(config.trainer, **trainer),
            data=attrs.evolve(config.data, **data),
            **top,
        )

    return make
