"""The cnet-train command: demo (the README's main job), config, export, errors."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cnet_models.facade import controlnet_weights_from_original, load_controlnet
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
        main(
            [
                "demo",
                "--out",
                str(out),
                "--family",
                family,
                "--steps",
                "4",
                "--samples",
                "12",
                "--random-base",
            ]
        )
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

    # The same checkpoint as single files: diffusers' converter reads back the folder export.
    single = tmp_path / "single"
    assert main(["export", str(checkpoint), str(single), "--format", "single-file"]) == 0
    assert sorted(p.name for p in single.iterdir()) == [
        "controlnet.safetensors",
        "controlnet_ema.safetensors",
    ]
    for name in ("controlnet", "controlnet_ema"):
        folder = load_controlnet(tmp_path / "exported" / name, None)
        stored = load_file(str(single / f"{name}.safetensors"))
        back = controlnet_weights_from_original(stored, dict(folder.config))
        for key, value in folder.state_dict().items():
            # diffusers' converter has no SDXL added-embedding rule: its original name then.
            label = key.replace("add_embedding.linear_1", "label_emb.0.0").replace(
                "add_embedding.linear_2", "label_emb.0.2"
            )
            found = back[key] if key in back else stored[f"control_model.{label}"]
            assert torch.equal(found, value), key


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
    assert err.startswith(f"cnet-train launch: error: invalid config {config} (2 problems):")
    assert "data.batch_size" in err and "optimiser" in err
    assert "cnet-train launch: hint: " in err and "Traceback" not in err
    assert not (tmp_path / "runs/x").exists() and not Path("runs/x").exists()


def test_paths_and_devices_are_checked_before_launch(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "run.yaml"
    config.write_text(
        "run_dir: runs/x\nmodel: {source: ./model}\ndata: {source: {path: data.jsonl}}\n"
        "trainer: {accelerator: cpu, devices: 4096}\n"
    )
    assert main(["config", str(config)]) == 2
    err = capsys.readouterr().err
    assert f"data.source.path: {tmp_path / 'data.jsonl'} does not exist" in err
    assert f"model.source: {tmp_path / 'model'} does not exist" in err
    assert "trainer.devices: 4096 CPU processes asked for" in err
    assert "hint: relative paths in a config file are relative to the file's folder" in err
    # --schema-only checks what the file says, not what this machine has.
    assert main(["config", str(config), "--schema-only"]) == 0
    assert f"run_dir: {tmp_path / 'runs/x'}" in capsys.readouterr().out


def test_every_failure_is_one_named_line_and_debug_adds_the_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(path: Path, overrides: object = ()) -> None:
        raise RuntimeError("something nobody foresaw")

    monkeypatch.setattr("cnet_train.config_io.load_config", broken)
    assert main(["config", str(tmp_path / "run.yaml")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("cnet-train config: error: unexpected RuntimeError: something nobody")
    assert "cnet-train config: hint: rerun with --debug" in err and "Traceback" not in err
    for argv in (["--debug", "config", "x.yaml"], ["config", "x.yaml", "--debug"]):
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert err.startswith("Traceback") and "cnet-train config: error: unexpected" in err


def test_a_missing_config_file_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["launch", str(tmp_path / "nowhere.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"cnet-train launch: error: config file {tmp_path / 'nowhere.yaml'}")


@pytest.mark.parametrize("name", ["sd15.yaml", "sd21.yaml", "sdxl.yaml"])
def test_examples_pass_schema_only_and_name_their_placeholders_otherwise(
    name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    example = Path(__file__).resolve().parents[2] / "examples" / name
    assert main(["config", str(example), "--schema-only"]) == 0
    assert f"run_dir: {example.parent / 'runs'}" in capsys.readouterr().out
    # On this machine the placeholder dataset path (/path/to/...) is the first thing named.
    assert main(["config", str(example)]) == 2
    assert (
        "data.source.path: /path/to/dataset/train.jsonl does not exist" in capsys.readouterr().err
    )
