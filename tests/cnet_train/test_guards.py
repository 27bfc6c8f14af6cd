"""Failure handling: a non-finite loss or weight stops training before it is saved; resume
skips a torn checkpoint; a full disk keeps the previous checkpoint."""

from __future__ import annotations

import errno
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import pytest
import torch

from cnet_data.outdir import OutputPathError
from cnet_train.callbacks import export as export_module
from cnet_train.callbacks.guard import NonFiniteLossError
from cnet_train.checkpointing import DurableCheckpointIO
from cnet_train.config import CheckpointConfig, TrainConfig, ValidationConfig
from cnet_train.errors import WriteFailedError
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


def test_resume_auto_knows_lightning_names_and_folder_commit_markers(
    make_config: MakeConfig, tmp_path: Path
) -> None:
    config = attrs.evolve(
        make_config("sd15"), run_dir=tmp_path, checkpoint=CheckpointConfig(resume="auto")
    )
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    torch.save({}, folder / "step-00000004.ckpt")
    torch.save({}, folder / "step-00000004-v1.ckpt")  # Lightning's name when one is taken
    assert resume_path(config) == folder / "step-00000004-v1.ckpt"
    newest_complete = folder / "step-00000004-v1.ckpt"
    for name, marker in (("step-00000006.ckpt", "latest"), ("step-00000008.ckpt", ".metadata")):
        (folder / name).mkdir()  # a DeepSpeed / distributed-checkpoint folder, torn: no marker
        (folder / name / "shard.pt").write_bytes(b"x")
        assert resume_path(config) == newest_complete
        (folder / name / marker).write_text("checkpoint")
        newest_complete = folder / name
    assert resume_path(config) == folder / "step-00000008.ckpt"
    (folder / ".step-00000010.ckpt.partial").mkdir()  # a write in progress is never chosen
    (folder / ".step-00000010.ckpt.partial" / "latest").write_text("checkpoint")
    assert resume_path(config) == folder / "step-00000008.ckpt"


def test_a_full_disk_keeps_the_previous_checkpoint_and_says_where_and_how_much_is_free(
    make_config: MakeConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = make_config(
        "sd15", steps=4, validation=ValidationConfig(), checkpoint=CheckpointConfig(every_n_steps=2)
    )
    real_save = DurableCheckpointIO.save_checkpoint

    def full_disk(
        self: DurableCheckpointIO, checkpoint: Any, path: Any, storage_options: Any = None
    ) -> None:
        if "step-00000004" in str(path):
            Path(path).write_bytes(b"half a checkpoint")
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real_save(self, checkpoint, path, storage_options)

    monkeypatch.setattr(DurableCheckpointIO, "save_checkpoint", full_disk)
    with pytest.raises(
        WriteFailedError, match=r"step-00000004\.ckpt \(No space left on device; [\d.]+ GiB free\)"
    ):
        fit(config, enable_progress_bar=False)
    folder = config.run_dir / "checkpoints"
    assert [p.name for p in folder.iterdir()] == ["step-00000002.ckpt"]
    assert (
        resume_path(attrs.evolve(config, checkpoint=CheckpointConfig()))
        == folder / "step-00000002.ckpt"
    )


def test_non_finite_weights_after_a_finite_loss_are_never_written(
    make_config: MakeConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    # What an infinite learning rate does: the step-1 loss is finite and the weights after
    # it are not. The guard must look at the weights, not only the loss, before any write.
    config = make_config("sd15", steps=2, validation=ValidationConfig())
    config = attrs.evolve(config, checkpoint=CheckpointConfig(every_n_steps=1))
    real_step = ControlNetModule.optimizer_step

    def overflowing_step(self: ControlNetModule, *args: Any, **kwargs: Any) -> None:
        real_step(self, *args, **kwargs)
        next(self.controlnet.parameters()).data.fill_(float("inf"))

    monkeypatch.setattr(ControlNetModule, "optimizer_step", overflowing_step)
    with pytest.raises(NonFiniteLossError, match="checkpoint of step 1"):
        fit(config, enable_progress_bar=False)
    checkpoints = config.run_dir / "checkpoints"
    assert not checkpoints.exists() or not list(checkpoints.iterdir())
    assert not (config.run_dir / "exports").exists()


def test_a_full_disk_during_an_export_keeps_the_previous_export(
    make_config: MakeConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = make_config("sd15", steps=4, validation=ValidationConfig())
    config = attrs.evolve(config, export=attrs.evolve(config.export, every_n_steps=2))
    from cnet_models.ema_export import export_controlnet as real_export

    def full_disk(controlnet: Any, out: Path) -> Path:
        if "step-00000004" in str(out):
            out.mkdir(parents=True)
            (out / "half.safetensors").write_bytes(b"x")
            raise OSError(errno.ENOSPC, "No space left on device", str(out))
        return real_export(controlnet, out)

    monkeypatch.setattr(export_module, "export_controlnet", full_disk)
    with pytest.raises(WriteFailedError, match=r"export .*step-00000004 \(No space left"):
        fit(config, enable_progress_bar=False)
    exports = config.run_dir / "exports"
    assert [p.name for p in exports.iterdir()] == ["step-00000002"]


def test_a_data_index_folder_that_is_not_an_index_is_refused_and_kept(
    make_config: MakeConfig, tmp_path: Path
) -> None:
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "precious.txt").write_text("x")
    config = make_config("sd15", steps=1, validation=ValidationConfig())
    config = attrs.evolve(config, data=attrs.evolve(config.data, index=folder))
    with pytest.raises(OutputPathError, match=r"mine is a folder that is not a cnet-data index"):
        fit(config, enable_progress_bar=False)
    assert [p.name for p in folder.iterdir()] == ["precious.txt"]
    assert (folder / "precious.txt").read_text() == "x"
