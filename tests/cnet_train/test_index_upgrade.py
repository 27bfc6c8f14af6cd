"""A run whose index an older cnet-data wrote indexes its dataset again instead of failing."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest

from cnet_data.index import INDEX_VERSION, DatasetIndex
from cnet_train.config import TrainConfig
from cnet_train.data import ensure_index, index_path

MakeConfig = Callable[..., TrainConfig]


def test_an_older_index_is_rebuilt(
    make_config: MakeConfig, caplog: pytest.LogCaptureFixture
) -> None:
    config = make_config("sd15")
    path = ensure_index(config)
    assert path == index_path(config)
    header = json.loads((path / "index.json").read_text())
    assert header["version"] == INDEX_VERSION
    # What version 1 wrote: the dataset root at the top, no store.
    header["root"] = header.pop("store")["root"]
    header["version"] = 1
    (path / "index.json").write_text(json.dumps(header))
    assert ensure_index(config) == path
    assert "older format" in caplog.text
    rebuilt = DatasetIndex(path)
    assert rebuilt.header["version"] == INDEX_VERSION and len(rebuilt) == header["count"]
