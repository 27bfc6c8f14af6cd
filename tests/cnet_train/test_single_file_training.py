"""A run whose base model is one original-layout checkpoint (as A1111 and ComfyUI keep them),
described by a diffusers folder: launched from its YAML file in a fresh process, it trains."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import attrs
import pytest

from cnet_train.config import TrainConfig
from cnet_train.config_io import ConfigError, dump_config
from cnet_train.preflight import preflight

MakeConfig = Callable[..., TrainConfig]


def test_a_single_file_base_model_trains(
    make_config: MakeConfig, single_file_of: Callable[[Path, Path], Path], tmp_path: Path
) -> None:
    config = make_config("sd15", steps=2)
    checkpoint = single_file_of(Path(config.model.source), tmp_path / "models" / "base.safetensors")
    model = attrs.evolve(config.model, source=str(checkpoint), config=config.model.source)
    config = attrs.evolve(
        config,
        model=model,
        control_gain=attrs.evolve(config.control_gain, enabled=False),
    )
    config_file = tmp_path / "run.yaml"
    config_file.write_text(dump_config(config))
    args = [sys.executable, "-m", "cnet_train.cli", "launch", str(config_file)]
    run = subprocess.run(args, capture_output=True, text=True, timeout=900, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    export = config.run_dir / "exports" / "step-00000002"
    assert (export / "controlnet" / "diffusion_pytorch_model.safetensors").is_file()


def test_a_pickled_or_missing_single_file_is_refused_before_the_launch(
    make_config: MakeConfig, tmp_path: Path
) -> None:
    config = make_config("sd15")
    for source, expected in (
        (tmp_path / "base.ckpt", "is a .ckpt checkpoint; cnet reads single files as .safetensors"),
        (tmp_path / "gone.safetensors", "does not exist"),
    ):
        changed = attrs.evolve(config, model=attrs.evolve(config.model, source=str(source)))
        with pytest.raises(ConfigError) as refused:
            preflight(changed, "launch")
        assert any(p.startswith("model.source") and expected in p for p in refused.value.problems)
