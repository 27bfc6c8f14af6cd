"""What a user sees of a run: the start-up summary, the step progress bar, a line per
validation, the end summary, labelled grids at the conditioning image's aspect, no expected
noise, and friendly refusals of what the machine cannot run.

The launches are real `cnet-train launch` subprocesses (their stdout and stderr together are
what a user reads); one run and its relaunch are shared by the tests that read them.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import attrs
import numpy as np
import pytest
import torch
from PIL import Image

from cnet_data.buckets import BucketConfig
from cnet_train.callbacks.validation import ValidationCallback
from cnet_train.config import TrainConfig, ValidationConfig
from cnet_train.config_io import ConfigError, config_from_dict, dump_config, load_config
from cnet_train.export import export_checkpoint
from cnet_train.plots import image_grid, labelled_grid
from cnet_train.preflight import preflight

MakeConfig = Callable[..., TrainConfig]

NOISE = (
    "requires torchvision",
    "module(s) in eval mode",
    "litlogger",
    "not resumable",
    "`weights_only` was not set",
    "Setting accelerator to CPU",
    "EMA state was saved with config",
    "Loading weights",
    "LeafSpec",
    "Epoch 0/",
    "Restored all states",
)
"""Fragments of every expected notice the issue lists (and Lightning's per-epoch bar)."""

STEPS, RESUMED_STEPS = 4, 6


@dataclass
class Launch:
    config: TrainConfig
    file: Path
    first: str
    """Everything the first launch printed."""
    second: str
    """Everything the relaunch (to RESUMED_STEPS, with `--set trainer.precision=32`) printed."""


def _launch(config_file: Path, *overrides: str) -> subprocess.CompletedProcess[str]:
    args = [sys.executable, "-m", "cnet_train.cli", "launch", str(config_file)]
    for item in overrides:
        args += ["--set", item]
    return subprocess.run(args, capture_output=True, text=True, timeout=900, check=False)


def _output(done: subprocess.CompletedProcess[str]) -> str:
    # The bar redraws in place with carriage returns; each drawing is a line to read here.
    return (done.stdout + done.stderr).replace("\r", "\n")


def _without_control_gain(config: TrainConfig) -> TrainConfig:
    """The run without the control-gain measurement: it renders at every validation (minutes
    on a shared CPU), and nothing in this file looks at it."""
    return attrs.evolve(config, control_gain=attrs.evolve(config.control_gain, enabled=False))


@pytest.fixture(scope="module")
def launched(tmp_path_factory: pytest.TempPathFactory) -> Launch:
    from cnet_train.demo import demo_config

    # make_config's run, built here once for the module (make_config is per test).
    root = tmp_path_factory.mktemp("ux")
    base = demo_config(root / "sd15", "sd15", steps=STEPS, samples=12)
    # Two pairs: a wide conditioning image (80x48 in the demo data) and a square one.
    wide = _first_with_aspect(base, wide=True)
    square = _first_with_aspect(base, wide=None)
    config = attrs.evolve(
        base,
        data=attrs.evolve(base.data, batch_size=2),
        validation=ValidationConfig(
            every_n_steps=2,
            prompts=("a wide picture of a shape", "a square one"),
            images=(wide, square),
            num_inference_steps=1,
            guidance_scale=3.0,
        ),
        checkpoint=attrs.evolve(base.checkpoint, every_n_steps=2, resume="auto"),
    )
    config = _without_control_gain(config)
    manifest = config.data.source.path
    with manifest.open("a") as fh:  # one bad sample: its image does not exist
        fh.write(json.dumps({"image": "nope.png", "conditioning_image": "nope.png", "text": "x"}))
        fh.write("\n")
    config_file = root / "run.yaml"
    config_file.write_text(dump_config(config))
    first = _launch(config_file)
    assert first.returncode == 0, _output(first)[-3000:]
    second = _launch(config_file, f"trainer.max_steps={RESUMED_STEPS}", "trainer.precision=32")
    assert second.returncode == 0, _output(second)[-3000:]
    return Launch(config, config_file, _output(first), _output(second))


def _first_with_aspect(config: TrainConfig, *, wide: bool | None) -> Path:
    folder = config.data.source.path.parent / "conditioning"
    for path in sorted(folder.glob("*.png")):
        with Image.open(path) as im:
            w, h = im.size
        if (wide is None and w == h) or (wide and w > h):
            return path
    raise AssertionError(f"no {'wide' if wide else 'square'} conditioning image in {folder}")


def _field(output: str, label: str) -> str:
    match = re.search(rf"^  {re.escape(label)}:\s+(.*)$", output, re.MULTILINE)
    assert match, f"no {label!r} line in:\n{output[-3000:]}"
    return match.group(1)


def test_start_up_summary_says_what_the_run_is(launched: Launch) -> None:
    out, run = launched.first, launched.config.run_dir
    assert f"cnet-train: run {run}" in out
    assert _field(out, "samples").startswith("12 indexed in ")
    report = run / "index.report.json"
    assert _field(out, "skipped as bad") == f"1 sample, listed in {report}"
    assert json.loads(report.read_text())["bad"] == 1
    assert _field(out, "buckets").startswith("3 in use of ")
    assert _field(out, "left out / epoch").startswith("0 of 12 samples")
    assert _field(out, "batch") == "2 per device, 2 global (2 x 1 device)"
    assert _field(out, "steps").startswith(f"6 per epoch; max_steps {STEPS}")
    assert _field(out, "strategy").startswith("SingleDeviceStrategy")
    assert _field(out, "precision").startswith("32 ")
    assert _field(out, "devices").startswith("1 cpu device x 1 node")
    assert _field(out, "resume") == "fresh start"


def test_relaunch_says_where_it_resumes(launched: Launch) -> None:
    checkpoint = launched.config.run_dir / "checkpoints" / f"step-{STEPS:08d}.ckpt"
    assert _field(launched.second, "resume") == f"step {STEPS} from {checkpoint}"
    assert _field(launched.second, "precision").startswith("32 ")  # --set trainer.precision=32


def test_progress_bar_counts_global_steps(launched: Launch) -> None:
    assert re.search(rf"^step {STEPS}/{STEPS} \|", launched.first, re.MULTILINE)
    # Resumed mid-epoch: from step 4 to 6 of max_steps, not batches of an epoch.
    assert re.search(rf"^step {RESUMED_STEPS}/{RESUMED_STEPS} \|", launched.second, re.MULTILINE)
    last = [line for line in launched.first.splitlines() if line.startswith(f"step {STEPS}/")]
    assert "samples/s" in last[-1] and "loss " in last[-1] and "<00:00" in last[-1]


def test_each_validation_prints_a_line(launched: Launch) -> None:
    run = launched.config.run_dir
    for step, out in ((2, launched.first), (4, launched.first), (6, launched.second)):
        grid = run / "validation" / f"step-{step:08d}.png"
        assert f"validation at step {step}: 2 images -> {grid}" in out
        assert grid.is_file()


def test_end_summary_lists_results_that_exist(launched: Launch) -> None:
    for out, step in ((launched.first, STEPS), (launched.second, RESUMED_STEPS)):
        assert f"cnet-train: finished at step {step} of {step}" in out
        end = out[out.index("cnet-train: finished") :]
        labels = ("ControlNet", "EMA ControlNet", "validation grid", "checkpoint", "config")
        for label in labels:
            path = Path(_field(end, label))
            assert path.exists(), label
            assert f"{step:08d}" in path.name or label in ("config", "ControlNet", "EMA ControlNet")
        assert Path(_field(end, "ControlNet")).parent.name == f"step-{step:08d}"
        curves = [Path(p) for p in _field(end, "loss curve").split(", ")]
        assert [p.name for p in curves] == ["loss.csv", "loss.png"]
        assert all(p.is_file() for p in curves)


def test_no_expected_noise_is_printed(launched: Launch) -> None:
    for out in (launched.first, launched.second):
        found = [fragment for fragment in NOISE if fragment in out]
        assert not found, f"{found} in:\n{out[-4000:]}"


def test_grid_has_prompts_and_keeps_the_aspect(launched: Launch) -> None:
    grid = np.asarray(
        Image.open(launched.config.run_dir / "validation" / f"step-{STEPS:08d}.png").convert("L")
    )
    wide, square = (Image.open(p) for p in launched.config.validation.images)
    cells = image_grid([[wide, square], [wide, square]])  # two rows of images, no labels
    assert grid.shape[0] > cells.height
    # The prompts: dark text on the white below the two rows of images.
    assert (grid[cells.height + 12 :] < 100).any()  # below the second row (68 px cells)
    # The wide conditioning image (black, with a white outline) is shown at its shape in the
    # first cell, not squeezed to a square: the box of its non-white pixels is 80 x 48.
    ys, xs = np.nonzero(grid[: cells.height // 2, : grid.shape[1] // 2] != 255)
    assert (xs.max() - xs.min() + 1, ys.max() - ys.min() + 1) == wide.size == (80, 48)


def test_export_of_a_checkpoint_does_not_warn_about_the_ema(
    launched: Launch, tmp_path: Path
) -> None:
    checkpoint = launched.config.run_dir / "checkpoints" / f"step-{RESUMED_STEPS:08d}.ckpt"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        written = export_checkpoint(checkpoint, tmp_path / "out")
    assert [p.name for p in written] == ["controlnet", "controlnet_ema"]
    assert not [w for w in caught if "EMA state was saved" in str(w.message)]


def test_conditioning_keeps_its_aspect_at_its_bucket(tmp_path: Path) -> None:
    path = tmp_path / "wide.png"
    Image.new("RGB", (300, 100), "white").save(path)
    buckets = BucketConfig(area=64 * 64, min_side=32, max_side=128, step=16)
    validation = ValidationConfig(prompts=("p",), images=(path,))
    control = ValidationCallback(tmp_path, validation, buckets)._control(0)
    assert control.size == (96, 32)  # 3:1 goes to the 3:1 bucket, not to a square
    # `validation.resolution` scales the same shapes to about that side squared.
    scaled = ValidationCallback(tmp_path, attrs.evolve(validation, resolution=128), buckets)
    assert scaled._control(0).size == (192, 64)


def test_labelled_grid_wraps_prompts_under_their_columns() -> None:
    images = [[Image.new("RGB", (64, 40), "red"), Image.new("RGB", (40, 64), "blue")]]
    short = labelled_grid(images, ["a"])
    long = labelled_grid(images, ["a prompt long enough to need several lines of text " * 3])
    assert long.height > short.height > image_grid([[im] for im in images[0]]).height
    assert long.width == short.width  # wrapped to the column, never widened
    with pytest.raises(ValueError, match="labels"):
        labelled_grid(images, [])


def test_precision_32_is_taken_as_a_number_or_a_string(make_config: MakeConfig) -> None:
    data = json.loads(json.dumps(_plain(make_config())))
    for value in (32, "32"):
        data["trainer"]["precision"] = value
        assert config_from_dict(data).trainer.precision == "32"
    data["trainer"]["precision"] = "bf16-mixed"
    assert config_from_dict(data, ["trainer.precision=32"]).trainer.precision == "32"
    with pytest.raises(ConfigError, match=r"trainer\.precision: 16 is not one of"):
        config_from_dict(data, ["trainer.precision=16"])


def _plain(config: TrainConfig) -> object:
    import yaml

    return yaml.safe_load(dump_config(config))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
def test_gpu_on_a_cpu_machine_is_refused_before_anything_loads(
    make_config: MakeConfig, tmp_path: Path
) -> None:
    config = make_config()
    config_file = tmp_path / "run.yaml"
    config_file.write_text(dump_config(config))
    done = _launch(config_file, "trainer.accelerator=gpu")
    assert done.returncode == 2
    error = [line for line in done.stderr.splitlines() if "trainer.accelerator" in line]
    assert len(error) == 1
    # A CPU build says why there is no GPU; a CUDA build on a machine without one (Python
    # 3.12's torch from PyPI) points at the driver instead.
    why = "no CUDA GPU" if torch.version.cuda is None else "no visible CUDA GPU"
    assert f"gpu asked for, but this machine has {why}" in error[0]
    assert "CPU core" in error[0] and "set trainer.accelerator to cpu" in error[0]
    assert "cnet-train: run" not in done.stdout  # nothing started
    assert "No supported gpu backend" not in done.stderr
    assert not (config.run_dir / "index").exists()  # no data touched


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
def test_precision_16_mixed_on_the_cpu_names_the_fix(make_config: MakeConfig) -> None:
    config = make_config(trainer_precision="16-mixed")
    with pytest.raises(ConfigError) as refused:
        preflight(config, "launch")
    (problem,) = refused.value.problems
    assert problem.startswith("trainer.precision: 16-mixed needs a CUDA GPU")
    assert "--set trainer.precision=32" in problem
    preflight(make_config(trainer_precision="bf16-mixed"), "launch")  # bf16 runs on the CPU


def test_loaded_yaml_precision_int(make_config: MakeConfig, tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    text = dump_config(make_config()).replace("precision: '32'", "precision: 32")
    assert "precision: 32\n" in text
    path.write_text(text)
    assert load_config(path).trainer.precision == "32"
