"""Failure handling: a non-finite loss stops training clearly; resume skips a torn checkpoint."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import pytest
import torch

from cnet_train.callbacks.guard import NonFiniteLossError
from cnet_train.config import CheckpointConfig, TrainConfig, ValidationConfig
from cnet_train.module import ControlNetModule
from cnet_train.trainer import fit, resume_path

MakeConfig = Callable[..., TrainConfig]


def test_non_finite_loss_stops_with_a_clear_message(
    make_config: MakeConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = make_config("sd15", steps=6, validation=ValidationConfig())
    config = attrs.evolve(config, trainer=attrs.evolve(config.trainer, log_every_n_steps=1))
    real_loss = ControlNetModule.loss

    def poisoned(self: ControlNetModule, batch: Any, step: int, micro: int = 0) -> torch.Tensor:
        loss = real_loss(self, batch, step, micro)
        return loss * float("nan") if step >= 2 else loss

    monkeypatch.setattr(ControlNetModule, "loss", poisoned)
    with pytest.raises(NonFiniteLossError, match="not finite at step 3"):
        fit(config, enable_progress_bar=False)


def test_resume_auto_takes_the_newest_complete_checkpoint(
    make_config: MakeConfig, tmp_path: Path
) -> None:
    config = attrs.evolve(
        make_config("sd15"), run_dir=tmp_path, checkpoint=CheckpointConfig(resume="auto")
    )
    folder = tmp_path / "checkpoints"
    assert resume_path(config) is None
    folder.mkdir()
    torch.save({"step": 4}, folder / "step-00000004.ckpt")
    torch.save({"step": 8}, folder / "step-00000008.ckpt")
    whole = (folder / "step-00000008.ckpt").read_bytes()
    (folder / "step-00000012.ckpt").write_bytes(whole[: len(whole) // 2])  # torn by a crash
    assert resume_path(config) == folder / "step-00000008.ckpt"
    none = attrs.evolve(config, checkpoint=CheckpointConfig(resume="none"))
    assert resume_path(none) is None
    missing = attrs.evolve(config, checkpoint=CheckpointConfig(resume=str(tmp_path / "x.ckpt")))
    with pytest.raises(FileNotFoundError, match=r"x\.ckpt does not exist"):
        resume_path(missing)
