"""State with one owner each (issue 10): stable state keys, old checkpoints still read, one
deferred-load helper, strict weight names, the stored config compared on resume by rule, and
`checkpoint.resume` as a typed value."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import torch

from cnet_models.ema import EMAConfig, ExponentialMovingAverage
from cnet_models.facade import ControlNetModel
from cnet_train.callbacks.data_progress import DataProgress
from cnet_train.callbacks.ema import EMACallback
from cnet_train.cli import main
from cnet_train.config import TrainConfig
from cnet_train.config_io import config_to_dict
from cnet_train.deferred import DeferredState
from cnet_train.export import export_checkpoint
from cnet_train.resume_check import (
    ResumeRefusedError,
    WeightsMismatchError,
    check_resume,
    record_run,
)
from cnet_train.resume_rules import compare, rule_for
from cnet_train.state_keys import DATA_PROGRESS_STATE_KEY, EMA_STATE_KEY

MakeConfig = Any


def _tiny_controlnet() -> ControlNetModel:
    torch.manual_seed(0)
    model: ControlNetModel = ControlNetModel(
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        layers_per_block=1,
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
        conditioning_embedding_out_channels=(16, 32),
    )
    return model


def _write_checkpoint(path: Path, ema_key: str) -> dict[str, torch.Tensor]:
    """A checkpoint as training writes one, its EMA (moved off the weights) under `ema_key`."""
    model = _tiny_controlnet()
    ema = ExponentialMovingAverage(model, EMAConfig())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # the live weights move on; the EMA keeps the old ones
    checkpoint = {
        "state_dict": {f"controlnet.{k}": v for k, v in model.state_dict().items()},
        "cnet_controlnet_config": dict(model.config),
        "callbacks": {ema_key: ema.full_state_dict()},
    }
    torch.save(checkpoint, path)
    return ema.shadow()


@pytest.mark.parametrize("key", [EMA_STATE_KEY, "EMACallback"])
def test_export_reads_the_ema_under_the_stable_key_and_the_old_one(
    key: str, tmp_path: Path
) -> None:
    shadow = _write_checkpoint(tmp_path / "step.ckpt", key)
    written = export_checkpoint(tmp_path / "step.ckpt", tmp_path / "out")
    assert [p.name for p in written] == ["controlnet", "controlnet_ema"]
    averaged = ControlNetModel.from_pretrained(str(tmp_path / "out" / "controlnet_ema"))
    name = next(iter(shadow))
    assert torch.equal(averaged.state_dict()[name], shadow[name])


def test_a_callback_state_under_another_name_is_not_taken_for_the_ema(tmp_path: Path) -> None:
    _write_checkpoint(tmp_path / "step.ckpt", "SomeOtherCallback")
    written = export_checkpoint(tmp_path / "step.ckpt", tmp_path / "out")
    assert [p.name for p in written] == ["controlnet"]


def test_state_keys_do_not_follow_class_names() -> None:
    class RenamedEMA(EMACallback):
        pass

    class RenamedProgress(DataProgress):
        pass

    assert RenamedEMA(EMAConfig()).state_key == EMACallback(EMAConfig()).state_key == "cnet.ema"
    assert RenamedProgress().state_key == DATA_PROGRESS_STATE_KEY == "cnet.data_progress"


def test_old_checkpoints_hand_their_state_to_the_stable_keys() -> None:
    ema_state = {"shadow": {}, "step": 3}
    checkpoint: dict[str, Any] = {"callbacks": {"EMACallback": ema_state}}
    EMACallback(EMAConfig()).on_load_checkpoint(None, None, checkpoint)  # type: ignore[arg-type]
    assert checkpoint["callbacks"][EMA_STATE_KEY] is ema_state
    data_state = {"sampler": {"epoch": 1}}
    checkpoint = {"ControlNetDataModule": data_state}
    DataProgress().on_load_checkpoint(None, None, checkpoint)  # type: ignore[arg-type]
    assert checkpoint["callbacks"][DATA_PROGRESS_STATE_KEY] is data_state
    # A checkpoint with the stable key keeps it.
    current = {"sampler": {"epoch": 2}}
    checkpoint = {
        "ControlNetDataModule": data_state,
        "callbacks": {DATA_PROGRESS_STATE_KEY: current},
    }
    DataProgress().on_load_checkpoint(None, None, checkpoint)  # type: ignore[arg-type]
    assert checkpoint["callbacks"][DATA_PROGRESS_STATE_KEY] is current


def test_deferred_state_is_held_until_its_owner_exists_and_applied_once() -> None:
    applied: list[object] = []
    deferred = DeferredState()
    holding: list[bool] = []
    deferred.offer({}, None)  # nothing saved: nothing held
    holding.append(deferred.holding)
    deferred.offer({"a": 1}, None)
    holding.append(deferred.holding)
    assert applied == []
    deferred.release(applied.append)
    deferred.release(applied.append)
    holding.append(deferred.holding)
    assert applied == [{"a": 1}]
    deferred.offer({"b": 2}, applied.append)  # the owner exists: applied at once
    holding.append(deferred.holding)
    assert applied == [{"a": 1}, {"b": 2}]
    assert holding == [False, True, False, False]


# -- the stored config and the weights, compared on resume


def _saved(
    config: TrainConfig, world_size: int = 1, names: list[str] | None = None
) -> dict[str, Any]:
    checkpoint: dict[str, Any] = {}
    record_run(checkpoint, config, world_size, names or ["controlnet.w"])
    return checkpoint


def _check(checkpoint: dict[str, Any], config: TrainConfig, world_size: int = 1) -> list[str]:
    changes = check_resume(checkpoint, config, world_size, ["controlnet.w"], source="ck.ckpt")
    return [c.line() for c in changes]


def test_the_stored_config_is_read_on_resume(make_config: MakeConfig) -> None:
    config = make_config("sd15")
    checkpoint = _saved(config)
    assert checkpoint["cnet_config"] == config_to_dict(config)
    assert _check(checkpoint, config) == []


@pytest.mark.parametrize(
    ("change", "key"),
    [
        (lambda c: {"model": {**c["model"], "source": "other/model"}}, "model.source"),
        (lambda c: {"model": {**c["model"], "family": "sdxl"}}, "model.family"),
        (lambda c: {"controlnet": {**c["controlnet"], "conditioning_channels": 1}}, "controlnet"),
    ],
)
def test_resume_refuses_another_model_or_architecture(
    make_config: MakeConfig, change: Any, key: str
) -> None:
    config = make_config("sd15")
    checkpoint = _saved(config)
    checkpoint["cnet_config"] = {**checkpoint["cnet_config"], **change(checkpoint["cnet_config"])}
    with pytest.raises(ResumeRefusedError) as refused:
        _check(checkpoint, config)
    message = str(refused.value)
    assert message.startswith("ck.ckpt was written by a run with other settings: " + key)
    assert "->" in message and "checkpoint.resume: none" in refused.value.hint


def test_resume_notes_another_batch_size_and_world_size(make_config: MakeConfig) -> None:
    # The sampler continues its global order with another global batch (tests/cnet_data's
    # resume tests), so moving to more GPUs or another batch size is said, not refused.
    config = make_config("sd15")
    checkpoint = _saved(config, world_size=2)
    old = checkpoint["cnet_config"]
    old["data"] = {**old["data"], "batch_size": 99}
    lines = _check(checkpoint, config, world_size=4)
    assert lines == [f"data.batch_size: 99 -> {config.data.batch_size}", "world size: 2 -> 4"]


def test_resume_allows_and_lists_deliberate_changes(
    make_config: MakeConfig, caplog: pytest.LogCaptureFixture
) -> None:
    config = make_config("sd15")
    checkpoint = _saved(config)
    old = checkpoint["cnet_config"]
    old["optimizer"] = {**old["optimizer"], "lr": 0.5}
    old["trainer"] = {**old["trainer"], "max_steps": 1}
    old["checkpoint"] = {**old["checkpoint"], "resume": "/elsewhere/step.ckpt"}  # quiet
    lr = config.optimizer.lr
    with caplog.at_level(logging.WARNING, logger="cnet_train.resume_check"):
        lines = _check(checkpoint, config)
    assert lines == [
        f"optimizer.lr: 0.5 -> {lr!r}",
        f"trainer.max_steps: 1 -> {config.trainer.max_steps}",
    ]
    assert "resuming ck.ckpt with changed settings: optimizer.lr: 0.5" in caplog.text


def test_the_most_specific_rule_decides() -> None:
    assert rule_for("controlnet.conditioning_channels").verdict == "refuse"  # type: ignore[union-attr]
    assert rule_for("controlnet.gradient_checkpointing").verdict == "note"  # type: ignore[union-attr]
    assert rule_for("controlnetx") is None and rule_for("optimizer.lr") is None
    # A key only one side has (another version's schema) is noted, never refused.
    (change,) = compare({"data": {"batch_size": 2}}, {"data": {}})
    assert change.key == "data.batch_size" and not change.refused


def test_loading_is_strict_for_the_saved_weight_names(make_config: MakeConfig) -> None:
    config = make_config("sd15")
    # ZeRO-1/2 checkpoints hold no module part: the recorded names are checked.
    checkpoint = _saved(config, names=["controlnet.w", "controlnet.extra"])
    with pytest.raises(WeightsMismatchError, match=r"unexpected 1 \(controlnet.extra\)"):
        _check(checkpoint, config)
    # A checkpoint file holds the weights themselves: their names are checked too.
    checkpoint = _saved(config)
    checkpoint["state_dict"] = {"controlnet.v": torch.zeros(1)}
    with pytest.raises(WeightsMismatchError) as mismatch:
        _check(checkpoint, config)
    assert "missing 1 (controlnet.w); unexpected 1 (controlnet.v)" in str(mismatch.value)


# -- checkpoint.resume as a typed value


def test_a_misspelt_resume_choice_fails_in_cnet_train_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "run.yaml"
    base = "run_dir: runs/x\nmodel: {source: ./model}\ndata: {source: {path: data.jsonl}}\n"
    config.write_text(base + "checkpoint: {resume: Auto}\n")
    assert main(["config", str(config), "--schema-only"]) == 2
    err = capsys.readouterr().err
    assert "checkpoint.resume: 'Auto' is not one of auto" in err
    assert "none, or a checkpoint path (write it as auto" in err
    config.write_text(base + "checkpoint: {resume: latest}\n")
    assert main(["config", str(config), "--schema-only"]) == 2
    assert "./latest for a folder of that name" in capsys.readouterr().err
    # The spellings users have still load: the two words, and a path (made absolute).
    config.write_text(base + "checkpoint: {resume: ckpt/step-00000004.ckpt}\n")
    assert main(["config", str(config), "--schema-only"]) == 0
    assert f"resume: {tmp_path / 'ckpt/step-00000004.ckpt'}" in capsys.readouterr().out
