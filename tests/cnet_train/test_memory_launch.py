"""The memory plan where a run meets a GPU: `cnet-train plan` exits 1 with the settings that
fit, and a launch settles `auto` UNet checkpointing from the plan and refuses a config that
cannot fit before it writes or loads anything.

The CPU has no device memory to plan against, so these tests give the launch a GPU's memory
through `launch_memory`; everything after that is the code a GPU launch runs."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from cnet_train import memory_launch
from cnet_train.cli import main
from cnet_train.config import TrainConfig
from cnet_train.config_io import dump_config, load_config
from cnet_train.memory_fix import with_overrides
from cnet_train.memory_launch import PlanDoesNotFitError, check_at_launch
from cnet_train.memory_plan import Planner
from cnet_train.trainer import fit

MakeConfig = Callable[..., TrainConfig]
UNET_CKPT = "controlnet.unet_gradient_checkpointing"
MiB = 2**20


def _peaks(config: TrainConfig) -> tuple[int, int]:
    """The plan's peak with the UNet checkpointed, and without."""
    planner = Planner()
    on = planner.plan(with_overrides(config, [f"{UNET_CKPT}=true"])).peak
    off = planner.plan(with_overrides(config, [f"{UNET_CKPT}=false"])).peak
    assert on < off, "checkpointing the UNet must shrink the plan for these tests to mean much"
    return on, off


def _give_gpu(monkeypatch: pytest.MonkeyPatch, memory: int) -> None:
    monkeypatch.setattr(memory_launch, "launch_memory", lambda config: memory)


def test_the_plan_command_exits_1_with_settings_that_fit_and_0_when_it_fits(
    make_config: MakeConfig, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = with_overrides(make_config("sd15", data_batch_size=4), [f"{UNET_CKPT}=false"])
    path = tmp_path / "run.yaml"
    path.write_text(dump_config(config))
    on, off = _peaks(config)
    between = f"{(on + off) / 2 / MiB:.4f}MiB"

    assert main(["plan", str(path), "--memory", between, "--devices", "1"]) == 1
    out = capsys.readouterr().out
    assert "does NOT fit" in out
    advice = out.split("to fit:")[1].split()
    assert advice == ["--set", f"{UNET_CKPT}=true"]

    assert main(["plan", str(path), "--memory", between, "--set", f"{UNET_CKPT}=true"]) == 0
    assert "fits in" in capsys.readouterr().out
    assert main(["plan", str(path), "--memory", "1MiB"]) == 1
    assert "no change cnet knows makes it fit" in capsys.readouterr().out


def test_the_plan_command_settles_auto_as_a_launch_would(
    make_config: MakeConfig, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = make_config("sd15", data_batch_size=4)
    assert config.controlnet.unet_gradient_checkpointing == "auto"
    path = tmp_path / "run.yaml"
    path.write_text(dump_config(config))
    on, off = _peaks(config)
    assert main(["plan", str(path), "--memory", f"{(on + off) / 2 / MiB:.4f}MiB"]) == 0
    out = capsys.readouterr().out
    assert f"{on / 2**30:.2f} GiB" in out  # the checkpointed plan, and it says so
    assert "controlnet.unet_gradient_checkpointing: auto -> true at launch" in out
    assert main(["plan", str(path), "--memory", f"{(off + MiB) / MiB:.4f}MiB"]) == 0
    assert "auto -> false at launch" in capsys.readouterr().out


def test_auto_checkpointing_switches_on_only_when_the_plan_needs_it(
    make_config: MakeConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = make_config("sd15", data_batch_size=4)
    on, off = _peaks(config)
    _give_gpu(monkeypatch, off + MiB)
    assert check_at_launch(config).controlnet.unet_gradient_checkpointing is False
    _give_gpu(monkeypatch, (on + off) // 2)
    assert check_at_launch(config).controlnet.unet_gradient_checkpointing is True
    explicit = with_overrides(config, [f"{UNET_CKPT}=false"])
    with pytest.raises(PlanDoesNotFitError, match=f"--set {UNET_CKPT}=true"):
        check_at_launch(explicit)  # a choice the user wrote is kept, and refused
    off_check = with_overrides(explicit, ["trainer.memory_check=false"])
    assert check_at_launch(off_check) == off_check


def test_on_the_cpu_auto_means_off(make_config: MakeConfig) -> None:
    config = make_config("sd15")
    assert check_at_launch(config).controlnet.unet_gradient_checkpointing is False


def test_a_launch_that_cannot_fit_is_refused_before_it_writes_anything(
    make_config: MakeConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = make_config("sd15", data_batch_size=4)
    _give_gpu(monkeypatch, 64 * MiB)  # less than the plan's margin alone
    with pytest.raises(PlanDoesNotFitError, match="GiB per device") as refused:
        fit(config)
    assert "no change cnet knows makes it fit" in str(refused.value)
    assert not config.run_dir.exists()


@pytest.mark.slow
def test_a_launch_trains_with_the_checkpointing_its_plan_switched_on(
    make_config: MakeConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = make_config("sd15", steps=1, data_batch_size=4)
    on, off = _peaks(config)
    _give_gpu(monkeypatch, (on + off) // 2)
    _, module = fit(config, enable_progress_bar=False)
    assert module.unet.is_gradient_checkpointing
    written = load_config(config.run_dir / "config.yaml")
    assert written.controlnet.unet_gradient_checkpointing is True
