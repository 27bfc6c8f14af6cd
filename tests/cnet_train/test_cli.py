"""The cnet-train command: demo (the README's main job), config, export, errors."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from cnet_train.cli import main


def test_help_is_fast_and_light() -> None:
    code = (
        "import sys\nfrom cnet_train.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in ('torch', 'diffusers', 'lightning') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "launch" in out.stdout and "demo" in out.stdout
    assert out.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_demo_then_export_then_pipeline(
    tmp_path: Path,
    family: str,
    capsys: pytest.CaptureFixture[str],
    render_with_controlnet: Callable[[Path, Path], object],
) -> None:
    out = tmp_path / "demo"
    assert (
        main(["demo", "--out", str(out), "--family", family, "--steps", "4", "--samples", "12"])
        == 0
    )
    printed = capsys.readouterr().out
    for label in ("ControlNet:", "EMA ControlNet:", "validation grid:", "loss curve:"):
        assert label in printed
    assert (out / "run" / "loss.png").is_file()
    assert next((out / "run" / "validation").glob("*.png")).is_file()

    # The resolved config prints, and the checkpoint exports without the YAML.
    assert main(["config", str(out / "demo.yaml"), "--set", "optimizer.lr=3e-4"]) == 0
    assert "lr: 0.0003" in capsys.readouterr().out
    checkpoint = sorted((out / "run" / "checkpoints").glob("*.ckpt"))[-1]
    assert main(["export", str(checkpoint), str(tmp_path / "exported")]) == 0

    for name in ("controlnet", "controlnet_ema"):
        render_with_controlnet(out / "model", tmp_path / "exported" / name)


def test_config_errors_name_the_key_and_load_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text(
        "run_dir: runs/x\nmodel: {source: /no/such/model}\n"
        "data: {source: {path: data.jsonl}, batch_size: 7.9}\noptimiser: {lr: 1}\n"
    )
    assert main(["launch", str(config)]) == 2
    err = capsys.readouterr().err
    assert "data.batch_size" in err and "optimiser" in err
    assert not Path("runs/x").exists()
