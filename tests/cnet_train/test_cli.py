"""The cnet-train command: demo (the README's main job), config, export, errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cnet_models.facade import (
    StableDiffusionControlNetPipeline,
    StableDiffusionXLControlNetPipeline,
    load_controlnet,
)
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
    tmp_path: Path, family: str, capsys: pytest.CaptureFixture[str]
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

    pipeline_class = (
        StableDiffusionXLControlNetPipeline
        if family == "sdxl"
        else StableDiffusionControlNetPipeline
    )
    control = Image.fromarray(np.zeros((64, 64, 3), np.uint8))
    for name in ("controlnet", "controlnet_ema"):
        controlnet = load_controlnet(tmp_path / "exported" / name, None)
        pipe = pipeline_class.from_pretrained(str(out / "model"), controlnet=controlnet)
        pipe.set_progress_bar_config(disable=True)  # type: ignore[no-untyped-call]
        image = pipe(
            "a red circle",
            image=control,
            num_inference_steps=2,
            height=64,
            width=64,
            output_type="np",
            generator=torch.Generator().manual_seed(0),
        ).images[0]
        assert np.asarray(image).shape == (64, 64, 3)


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
