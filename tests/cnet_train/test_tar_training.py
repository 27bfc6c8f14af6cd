"""A run whose data is tar shards: launched from its YAML file in a fresh process, as a user
would, and resumed; the index it builds reads the shards by byte range."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import attrs
import pytest

from cnet_data.index import DatasetIndex
from cnet_data.sources import SourceConfig
from cnet_data.synthetic import write_fill_shards
from cnet_train.config import TrainConfig
from cnet_train.config_io import ConfigError, dump_config
from cnet_train.demo import DEMO_SIZES
from cnet_train.preflight import preflight

MakeConfig = Callable[..., TrainConfig]


def _launch(config_file: Path, *overrides: str) -> subprocess.CompletedProcess[str]:
    args = [sys.executable, "-m", "cnet_train.cli", "launch", str(config_file)]
    for item in overrides:
        args += ["--set", item]
    return subprocess.run(args, capture_output=True, text=True, timeout=900, check=False)


def test_a_run_on_tar_shards_trains_and_resumes(make_config: MakeConfig, tmp_path: Path) -> None:
    shards = tmp_path / "shards"
    write_fill_shards(shards, 12, samples_per_shard=5, sizes=DEMO_SIZES, seed=1)
    config = make_config("sd15", steps=2, data_source=SourceConfig(shards))
    config = attrs.evolve(config, control_gain=attrs.evolve(config.control_gain, enabled=False))
    config_file = tmp_path / "run.yaml"
    text = dump_config(config)
    config_file.write_text(text)

    first = _launch(config_file)
    assert first.returncode == 0, first.stderr[-3000:]
    index = DatasetIndex(config.run_dir / "index")
    assert index.store.kind == "tar" and len(index) == 12
    assert index.store.describe(index[0].image).endswith("00000.tar member 000000.png")

    again = _launch(config_file, "trainer.max_steps=4")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resum" in (again.stdout + again.stderr).lower()
    assert (config.run_dir / "checkpoints").is_dir()
    assert sorted(p.name for p in (config.run_dir / "exports").iterdir())[-1] == "step-00000004"


def test_a_tar_source_without_shards_is_refused_before_the_launch(
    make_config: MakeConfig, tmp_path: Path
) -> None:
    folder = tmp_path / "empty"
    folder.mkdir()
    (folder / "00000.tar.gz").write_bytes(b"\x1f\x8b")
    config = make_config("sd15", data_source=SourceConfig(folder, format="tar"))
    with pytest.raises(ConfigError) as refused:
        preflight(config, "launch")
    (problem,) = refused.value.problems
    assert problem.startswith(f"data.source.path: tar dataset {folder} holds no .tar shard")
    assert "uncompressed" in problem
    write_fill_shards(folder, 2)
    preflight(config, "launch")  # shards there: nothing to refuse
