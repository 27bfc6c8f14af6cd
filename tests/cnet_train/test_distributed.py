"""The demo config under DDP in two CPU processes (gloo): equal steps, one export that loads."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import attrs
import pytest

from cnet_models.facade import ControlNetModel
from cnet_train.config import CheckpointConfig
from cnet_train.config_io import dump_config
from cnet_train.demo import demo_config

WORKER = Path(__file__).with_name("ddp_worker.py")


@pytest.mark.distributed
def test_two_process_ddp_run(
    tmp_path: Path, run_ranks: Callable[[Sequence[str], int], list[str]]
) -> None:
    config = demo_config(tmp_path / "demo", "sd15", steps=4, samples=24)
    config = attrs.evolve(config, checkpoint=CheckpointConfig(every_n_steps=2, resume="none"))
    path = tmp_path / "ddp.yaml"
    path.write_text(dump_config(config))
    run_ranks([str(WORKER), str(path), str(tmp_path)], 2)
    ranks = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["step"] == ranks[1]["step"] == 4
    assert len(ranks[0]["batches"]) == len(ranks[1]["batches"]) == 4
    for mine, theirs in zip(ranks[0]["batches"], ranks[1]["batches"], strict=True):
        assert len(set(mine + theirs)) == 1  # both ranks drew from the same bucket
    export = config.run_dir / "exports" / "step-00000004"
    assert isinstance(ControlNetModel.from_pretrained(str(export / "controlnet")), ControlNetModel)
    assert (export / "controlnet_ema").is_dir()
    assert sorted(p.name for p in (config.run_dir / "validation").iterdir()) == [
        "step-00000004.png"
    ]
