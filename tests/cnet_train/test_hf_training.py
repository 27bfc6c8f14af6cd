"""A run whose data is a Hugging Face dataset (parquet, the fill50k layout): launched from its
YAML file in a fresh process, as a user would; the index reads the rows where they lie."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import attrs
import pytest

from cnet_data.index import DatasetIndex
from cnet_data.sources import SourceConfig
from cnet_data.synthetic import write_fill_dataset
from cnet_train.config import TrainConfig
from cnet_train.config_io import ConfigError, dump_config
from cnet_train.demo import DEMO_SIZES
from cnet_train.preflight import preflight

datasets = pytest.importorskip("datasets")
MakeConfig = Callable[..., TrainConfig]


def _write_parquet(folder: Path, count: int) -> Path:
    loose = folder.parent / "loose"
    write_fill_dataset(loose, count, sizes=DEMO_SIZES, seed=2)
    lines = [json.loads(x) for x in (loose / "manifest.jsonl").read_text().splitlines()]
    columns = {  # the images' bytes embedded, as the hub serves a dataset
        key: [{"bytes": (loose / x[key]).read_bytes(), "path": None} for x in lines]
        for key in ("image", "conditioning_image")
    }
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "conditioning_image": datasets.Image(),
            "text": datasets.Value("string"),
        }
    )
    rows = datasets.Dataset.from_dict({**columns, "text": [x["text"] for x in lines]}, features)
    (folder / "data").mkdir(parents=True)
    shutil.rmtree(loose)  # the rows hold the images themselves
    rows.to_parquet(str(folder / "data" / "train-00000-of-00001.parquet"))
    return folder


def test_a_run_on_a_parquet_dataset_trains(make_config: MakeConfig, tmp_path: Path) -> None:
    folder = _write_parquet(tmp_path / "fill", 8)
    config = make_config("sd15", steps=2, data_source=SourceConfig(folder))
    config = attrs.evolve(config, control_gain=attrs.evolve(config.control_gain, enabled=False))
    config_file = tmp_path / "run.yaml"
    config_file.write_text(dump_config(config))
    args = [sys.executable, "-m", "cnet_train.cli", "launch", str(config_file)]
    run = subprocess.run(args, capture_output=True, text=True, timeout=900, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    index = DatasetIndex(config.run_dir / "index")
    assert index.store.kind == "hf" and len(index) == 8
    assert index.store.describe(index[0].image).endswith("row 0 column image")
    assert sorted(p.name for p in (config.run_dir / "exports").iterdir())[-1] == "step-00000002"


def test_a_dataset_folder_without_rows_is_refused_before_the_launch(
    make_config: MakeConfig, tmp_path: Path
) -> None:
    folder = tmp_path / "saved"
    folder.mkdir()
    (folder / "dataset_info.json").write_text("{}")
    config = make_config("sd15", data_source=SourceConfig(folder))
    with pytest.raises(ConfigError) as refused:
        preflight(config, "launch")
    (problem,) = refused.value.problems
    assert problem.startswith(f"data.source.path: dataset folder {folder} holds no .parquet")
