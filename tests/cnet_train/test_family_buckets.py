"""Training's bucket defaults follow the base model's family, as `cnet-data buckets --config`
does: `data.buckets` left out (or some of its keys) takes the family's resolution, keys written
win, and the start-up summary says where the bucket area came from.

The tiny models' UNet configs have their family's structure, so a tiny SD 1.5 folder is
detected as SD 1.5 and gets its full-size 512x512 area; the tests build the data module (no
image is loaded at that size) rather than train at it.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from pathlib import Path
from typing import cast

import attrs
import lightning as L
import numpy as np
import pytest
import yaml

from cnet_data.buckets import BucketConfig, BucketSettings, BucketTable
from cnet_data.cli import main as cnet_data_main
from cnet_models.configs import BaseModelConfig
from cnet_train.callbacks.validation import ValidationCallback
from cnet_train.config import TrainConfig, ValidationConfig
from cnet_train.config_io import config_from_dict, config_to_dict, dump_config, load_config
from cnet_train.data import ControlNetDataModule, run_buckets
from cnet_train.preflight import ConfigError, preflight
from cnet_train.summary import _data_lines
from cnet_train.trainer import build_callbacks

MakeConfig = Callable[..., TrainConfig]

SD15 = BucketConfig.for_resolution(512)
"""SD 1.5's bucket defaults: 512x512 area, sides 256..1024."""


def _unset(make_config: MakeConfig, family: str = "sd15", **changes: object) -> TrainConfig:
    """The tiny run of `family` with `data.buckets` left out."""
    return make_config(family, data_buckets=BucketSettings(), **changes)


def _data_module(config: TrainConfig) -> ControlNetDataModule:
    module = ControlNetDataModule(config)
    module.setup("fit")
    return module


def _summary(module: ControlNetDataModule) -> dict[str, str]:
    """The start-up summary's data lines of `module`, by label."""
    trainer = cast(L.Trainer, types.SimpleNamespace(accumulate_grad_batches=1, max_steps=4))
    lines = [line.strip().split(":", 1) for line in _data_lines(trainer, module)]
    return {label: value.strip() for label, value in lines}


def test_sd15_folder_without_buckets_trains_at_the_sd15_area(make_config: MakeConfig) -> None:
    config = _unset(make_config)
    module = _data_module(config)
    assert module.buckets is not None and module.buckets.config == SD15
    assert module.dataset is not None
    assert module.dataset.table.buckets == BucketTable.from_config(SD15).buckets
    # The demo's square images take the square bucket at SD 1.5's side, not SDXL's 1024.
    assert module.sampler is not None
    table = module.dataset.table
    used = {(table[int(i)].width, table[int(i)].height) for i in module.sampler.raw_bucket_ids}
    assert (512, 512) in used and (1024, 1024) not in used
    summary = _summary(module)
    assert summary["bucket area"].startswith("262144 (512x512): the sd15 default (")
    assert "unet/config.json shows sd15" in summary["bucket area"]


@pytest.mark.parametrize(("family", "side"), [("sd21", 768), ("sdxl", 1024)])
def test_each_tiny_family_folder_gets_its_family_area(
    make_config: MakeConfig, family: str, side: int
) -> None:
    resolved = run_buckets(_unset(make_config, family))
    assert resolved.config == BucketConfig.for_resolution(side)
    assert resolved.origin.startswith(f"the {family} default")


def test_model_family_sdxl_without_buckets_gives_1024(make_config: MakeConfig) -> None:
    base = _unset(make_config)
    hub = attrs.evolve(base, model=BaseModelConfig(source="org/hub-model", family="sdxl"))
    module = _data_module(hub)
    assert module.buckets is not None and module.buckets.config == BucketConfig()
    assert module.buckets.config.area == 1024 * 1024
    assert _summary(module)["bucket area"].startswith(
        "1048576 (1024x1024): the sdxl default (model.family sdxl)"
    )


def test_an_unknown_family_keeps_the_default_and_the_summary_says_so(
    make_config: MakeConfig,
) -> None:
    base = _unset(make_config)
    hub = attrs.evolve(base, model=BaseModelConfig(source="org/hub-model"))
    module = _data_module(hub)
    assert module.buckets is not None and module.buckets.config == BucketConfig()
    line = _summary(module)["bucket area"]
    assert line.startswith("1048576 (1024x1024): the default (SDXL's): the model family is unknown")
    assert "'org/hub-model' is a hub id" in line and "set model.family" in line


def test_written_bucket_keys_win_over_the_family(make_config: MakeConfig) -> None:
    written = BucketSettings(area=320 * 320, step=32)
    module = _data_module(make_config("sd15", data_buckets=written))
    assert module.buckets is not None
    got = module.buckets.config
    # The keys written, and SD 1.5's sides (for step 32) for the rest: not SDXL's 512..2048.
    assert (got.area, got.step) == (320 * 320, 32)
    assert (got.min_side, got.max_side) == (256, 1024)
    assert _summary(module)["bucket area"] == "102400 (320x320): data.buckets.area of the config"


def test_the_demo_buckets_written_in_full_stay_as_they_are(make_config: MakeConfig) -> None:
    config = make_config("sd15")
    demo = BucketConfig(area=64 * 64, min_side=32, max_side=128, step=16)
    assert config.data.buckets == BucketSettings(**attrs.asdict(demo))
    assert run_buckets(config).config == demo


def test_validation_sizes_follow_the_family_buckets(make_config: MakeConfig) -> None:
    config = _unset(make_config, validation=ValidationConfig())
    callback = next(c for c in build_callbacks(config) if isinstance(c, ValidationCallback))
    assert callback.table.buckets == BucketTable.from_config(SD15).buckets


def test_unset_buckets_round_trip_and_take_overrides(make_config: MakeConfig) -> None:
    config = _unset(make_config)
    data = yaml.safe_load(dump_config(config))
    assert data["data"]["buckets"] == {
        "area": None,
        "min_side": None,
        "max_side": None,
        "step": None,
    }
    assert config_from_dict(data) == config
    partial = config_from_dict(config_to_dict(config), ["data.buckets.area=409600"])
    assert partial.data.buckets.given() == {"area": 409600}
    assert run_buckets(partial).config == attrs.evolve(SD15, area=409600)


def test_preflight_refuses_keys_that_do_not_fit_the_family(make_config: MakeConfig) -> None:
    # 128x128 is below SD 1.5's 256 min_side squared: no table, before any model loads.
    config = make_config("sd15", data_buckets=BucketSettings(area=128 * 128))
    with pytest.raises(ConfigError) as caught:
        preflight(config, "config")
    assert any(
        p.startswith("data.buckets: bucket settings {'area': 16384} do not fit")
        for p in caught.value.problems
    ), caught.value.problems


def test_cnet_data_buckets_and_training_show_one_table(
    make_config: MakeConfig, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """One YAML file: `cnet-data buckets --config` and the launch's data module agree on the
    area, the sides and the bucket of every sample."""
    config = _unset(make_config)
    data = config_to_dict(config)
    data["data"]["buckets"] = {"step": 32}  # one key written, the rest SD 1.5's
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    module = _data_module(load_config(path))  # builds RUN_DIR/index, which cnet-data reads
    assert module.buckets is not None and module.sampler is not None
    expected = BucketConfig.for_resolution(512, 32)
    assert module.buckets.config == expected
    capsys.readouterr()
    assert cnet_data_main(["buckets", "--config", str(path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"{module.buckets.line()}; sides 256..1024, step 32"
    assert module.dataset is not None
    table = module.dataset.table
    counts = np.bincount(module.sampler.raw_bucket_ids, minlength=len(table))
    rows = {line.split()[1]: int(line.split()[3]) for line in out[2:] if "x" in line.split()[1]}
    trained = {f"{table[i].width}x{table[i].height}": int(n) for i, n in enumerate(counts) if n}
    assert rows == trained and sum(rows.values()) == 12


def test_cnet_train_config_prints_the_bucket_area_as_a_comment(
    make_config: MakeConfig, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from cnet_train.cli import main as cnet_train_main

    data = config_to_dict(_unset(make_config))
    del data["data"]["buckets"]  # left out of the file altogether
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    capsys.readouterr()
    assert cnet_train_main(["config", str(path)]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[-1].startswith("# bucket area 262144 (512x512): the sd15 default (")
    assert config_from_dict(yaml.safe_load(out)) == load_config(path)  # still the config
