"""The shipped example configs load through the real schema, with the values they promise.

Only the YAML is read and checked: no model, dataset or device is touched.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from cnet_train.config import TrainConfig
from cnet_train.config_io import load_config

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
CONFIGS = sorted(EXAMPLES.glob("*.yaml"))


def _load(name: str, overrides: tuple[str, ...] = ()) -> TrainConfig:
    return load_config(EXAMPLES / name, overrides)


def test_every_family_has_an_example() -> None:
    assert [p.name for p in CONFIGS] == ["sd15.yaml", "sd21.yaml", "sdxl.yaml"]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_example_loads_with_real_run_values(path: Path) -> None:
    config = load_config(path)
    assert config.optimizer.lr == pytest.approx(1e-5)
    assert config.trainer.precision == "bf16-mixed"
    assert config.trainer.accelerator == "gpu"
    assert config.model.frozen_dtype == "bfloat16"
    assert config.conditioning.caption_dropout == pytest.approx(0.05)
    assert config.ema.enabled
    assert config.checkpoint.every_n_steps > 0
    assert config.export.every_n_steps > 0
    assert config.validation.every_n_steps > 0
    assert len(config.validation.prompts) == len(config.validation.images) > 0
    assert config.data.source.path.suffix == ".jsonl"


@pytest.mark.parametrize(
    ("name", "source", "side"),
    [
        ("sd15.yaml", "stable-diffusion-v1-5/stable-diffusion-v1-5", 512),
        ("sd21.yaml", "stabilityai/stable-diffusion-2-1", 768),
        ("sdxl.yaml", "stabilityai/stable-diffusion-xl-base-1.0", 1024),
    ],
)
def test_example_names_a_hub_model_and_its_resolution(name: str, source: str, side: int) -> None:
    config = _load(name)
    assert config.model.source == source
    assert config.data.buckets.area == side * side
    assert config.validation.resolution == side


def test_sdxl_example_uses_deepspeed_stage_2_and_the_cache() -> None:
    config = _load("sdxl.yaml")
    assert config.trainer.strategy == "deepspeed"
    assert config.trainer.deepspeed_stage == 2
    assert config.cache.path is not None
    # bfloat16 needs no fp16-safe VAE; the file names it in a comment for float16 users.
    assert config.model.vae is None
    assert "madebyollin/sdxl-vae-fp16-fix" in (EXAMPLES / "sdxl.yaml").read_text()


def test_sd21_example_leaves_family_and_prediction_type_to_the_model_folder() -> None:
    # The schema has no prediction-type key by design: v-prediction comes from the folder's
    # scheduler config, and the file says so to its reader.
    assert _load("sd21.yaml").model.family is None
    assert "v_prediction" in (EXAMPLES / "sd21.yaml").read_text()


@pytest.mark.parametrize(
    "script", ["multinode/sbatch.sh", "multinode/torchrun.sh"], ids=lambda s: s
)
def test_multinode_overrides_apply_to_the_config_they_launch(script: str) -> None:
    text = (EXAMPLES / script).read_text()
    assert "launch" in text
    overrides = tuple(re.findall(r"--set (\S+)", text))
    assert overrides == ("trainer.num_nodes=2", "trainer.devices=8")
    config = _load("sdxl.yaml", overrides)
    assert (config.trainer.num_nodes, config.trainer.devices) == (2, 8)


def test_readme_multi_gpu_overrides_apply() -> None:
    config = _load("sd15.yaml", ("trainer.devices=8", "trainer.strategy=ddp"))
    assert (config.trainer.devices, config.trainer.strategy) == (8, "ddp")
