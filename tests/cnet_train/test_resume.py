"""Exact resume: stopped mid-epoch at step k and resumed, a run ends bitwise where an
uninterrupted run of the same length ends (weights, EMA, optimizer state)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import pytest
import torch

from cnet_data.dataset import AugmentConfig
from cnet_train.callbacks.ema import EMACallback
from cnet_train.callbacks.history import LossHistory
from cnet_train.config import CheckpointConfig, TrainConfig, ValidationConfig
from cnet_train.trainer import fit

MakeConfig = Callable[..., TrainConfig]
QUIET: dict[str, Any] = {"enable_progress_bar": False}


def _final_state(config: TrainConfig, **overrides: Any) -> dict[str, Any]:
    trainer, module = fit(config, **QUIET, **overrides)
    callbacks = trainer.callbacks  # type: ignore[attr-defined]
    ema = next(c for c in callbacks if isinstance(c, EMACallback))
    history = next(c for c in callbacks if isinstance(c, LossHistory))
    assert ema.ema is not None
    optimizer = trainer.optimizers[0].state_dict()
    return {
        "step": trainer.global_step,
        "weights": {k: v.clone() for k, v in module.controlnet.state_dict().items()},
        "ema": {k: v.clone() for k, v in ema.ema.shadow().items()},
        "optimizer": optimizer["state"],
        "lr": [g["lr"] for g in optimizer["param_groups"]],
        "trained_steps": history.steps,
    }


def _assert_bitwise_equal(a: Any, b: Any, where: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            _assert_bitwise_equal(a[key], b[key], f"{where}.{key}")
    else:
        assert a == b, where


def test_resume_mid_epoch_is_bitwise_exact(make_config: MakeConfig, tmp_path: Path) -> None:
    # 12 samples in 3 buckets of 4, batches of 2: 6 steps an epoch; stop at 4, end at 9.
    base = make_config(
        "sd15",
        steps=9,
        data_batch_size=2,
        validation=ValidationConfig(),
        checkpoint=CheckpointConfig(every_n_steps=4, keep_last=3, resume="auto"),
    )
    straight = _final_state(attrs.evolve(base, run_dir=tmp_path / "straight"))
    interrupted = attrs.evolve(base, run_dir=tmp_path / "interrupted")
    first = _final_state(interrupted, max_steps=4)  # the same config, stopped early
    assert first["step"] == 4
    assert (interrupted.run_dir / "checkpoints" / "step-00000004.ckpt").is_file()
    resumed = _final_state(interrupted)
    assert straight["step"] == resumed["step"] == 9
    assert straight.pop("trained_steps") == list(range(1, 10))
    _assert_bitwise_equal(straight, {k: v for k, v in resumed.items() if k != "trained_steps"})
    assert not torch.equal(
        next(iter(first["weights"].values())), next(iter(resumed["weights"].values()))
    ) or any(not torch.equal(first["weights"][k], resumed["weights"][k]) for k in first["weights"])


@pytest.mark.parametrize("workers", [0, 2], ids=["in-process", "persistent-workers"])
def test_resume_from_the_last_batch_of_an_epoch_is_bitwise_exact(
    make_config: MakeConfig, tmp_path: Path, workers: int
) -> None:
    # 6 steps an epoch: the checkpoint at step 6 is the epoch's last batch; the run ends in
    # the third epoch, so the epoch numbering after the resume is checked too. With workers,
    # which persist over the epochs, each epoch must still draw its own flips.
    base = make_config(
        "sd15",
        steps=14,
        data_batch_size=2,
        data_num_workers=workers,
        data_augment=AugmentConfig(flip_probability=0.5),
        validation=ValidationConfig(),
        checkpoint=CheckpointConfig(every_n_steps=6, keep_last=3, resume="auto"),
    )
    straight = _final_state(attrs.evolve(base, run_dir=tmp_path / "straight"))
    interrupted = attrs.evolve(base, run_dir=tmp_path / "interrupted")
    assert _final_state(interrupted, max_steps=6)["step"] == 6
    resumed = _final_state(interrupted)
    assert resumed.pop("trained_steps") == list(range(7, 15))
    straight.pop("trained_steps")
    _assert_bitwise_equal(straight, resumed)
