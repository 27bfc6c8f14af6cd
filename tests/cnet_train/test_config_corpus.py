"""A corpus of malformed configs: `cnet-train config` and `cnet-train launch`, each run as a
real process, refuse every one within 10 s, with a message that names the key, and load nothing.

Each case is one defect in an otherwise valid config (the control case shows that config
passes). The model is a real tiny model folder, so a launch that got past the checks would load
it; an import hook in the child processes records whether the training code, Lightning or
diffusers was ever imported, and the run directory must not appear.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

import attrs
import pytest
import yaml

from cnet_train import preflight as preflight_module
from cnet_train.config import CacheConfig, TrainConfig
from cnet_train.config_io import ConfigError, load_config
from cnet_train.preflight import Command, preflight

CLI = [sys.executable, "-m", "cnet_train.cli"]
LIMIT_S = 10.0
"""CPU seconds a refusal may take (about 3 on an idle 2-core machine, mostly importing torch)."""
WALL_LIMIT_S = 60.0
"""Wall-clock seconds before a process counts as hung (other test runs may share the cores)."""
HEAVY = ("cnet_train.trainer", "lightning", "diffusers")
WATCH_IMPORTS = f"""
import os, sys

class _Watch:
    def find_spec(self, name, path=None, target=None):
        if name in {HEAVY!r}:
            with open(os.environ["CNET_CORPUS_MARKER"], "a") as out:
                out.write(name + "\\n")
        return None

sys.meta_path.insert(0, _Watch())
"""
MakeConfig = Callable[..., TrainConfig]
MANY = max(64, (os.cpu_count() or 1) + 1)
"""More devices than this machine has cores (64 on the 2-core test machine)."""

Edit = Callable[[dict[str, Any]], None]


@attrs.frozen
class Case:
    name: str
    key: str
    """What the error message must name."""
    edit: Edit | None = None
    """Changes the valid config's data; or None when `text` is given."""
    text: Callable[[str], str] | None = None
    """Rewrites the valid config's YAML text (for what a mapping cannot hold)."""
    overrides: tuple[str, ...] = ()


def _set(dotted: str, value: object) -> Edit:
    def edit(data: dict[str, Any]) -> None:
        *sections, last = dotted.split(".")
        node = data
        for name in sections:
            node = node.setdefault(name, {})
        node[last] = value

    return edit


def _laughs(text: str) -> str:
    lines = ["lol:", "  a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    for prev, name in zip("abcdefgh", "bcdefghi", strict=True):
        lines.append(f"  {name}: &{name} [{', '.join([f'*{prev}'] * 9)}]")
    return text + "\n".join(lines) + "\n"


CASES = [
    Case("5000-deep list", "seed", text=lambda t: t + "seed: " + "[" * 5000 + "]" * 5000 + "\n"),
    Case("3000-deep map", "seed", text=lambda t: t + "seed: " + "{a: " * 3000 + "1" + "}" * 3000),
    Case("billion laughs", "lol", text=_laughs),
    Case("duplicate key", "optimizer.lr", text=lambda t: t + "optimizer:\n  lr: 1\n  lr: 2\n"),
    Case("devices 0", "trainer.devices", _set("trainer.devices", 0)),
    Case("devices -3", "trainer.devices", _set("trainer.devices", -3)),
    Case(f"devices {MANY}", "trainer.devices", _set("trainer.devices", MANY)),
    Case("lr .inf", "optimizer.lr", _set("optimizer.lr", float("inf"))),
    Case("lr .nan", "optimizer.lr", _set("optimizer.lr", float("nan"))),
    Case("lr .nan in --set", "optimizer.lr", overrides=("optimizer.lr=.nan",)),
    Case(
        "gradient_clip_val -1", "trainer.gradient_clip_val", _set("trainer.gradient_clip_val", -1)
    ),
    Case("negative eps", "optimizer.eps", _set("optimizer.eps", -1e-8)),
    Case("betas [2, -1]", "optimizer.betas", _set("optimizer.betas", [2, -1])),
    Case("seed -1", "seed", _set("seed", -1)),
    Case("seed 2**70", "seed", _set("seed", 2**70)),
    Case("prompts and images differ", "validation.prompts", _set("validation.prompts", ["a", "b"])),
    Case("missing validation image", "validation.images[0]", _set("validation.images", ["x.png"])),
    Case("missing data source", "data.source.path", _set("data.source", {"path": "none.jsonl"})),
    Case("missing local model", "model.source", _set("model.source", "/no/such/model")),
    Case("relative model.source missing", "model.source", _set("model.source", "models/a/sd15")),
    Case("key typo", "optimizer.lrr", _set("optimizer.lrr", 1e-4)),
    Case("section typo", "trainr", _set("trainr.max_steps", 1)),
    Case("string for an integer", "data.batch_size", _set("data.batch_size", "8")),
    Case("string for a boolean", "trainer.compile", _set("trainer.compile", "maybe")),
]
"""The cases run as processes (two each): the issue's list, key typos and wrong types. The
other value and path checks are tested in process, in test_config.py and test_cli.py."""


@pytest.fixture(scope="module")
def corpus_root(
    tmp_path_factory: pytest.TempPathFactory, tiny_models: Callable[[str], Path]
) -> tuple[Path, dict[str, Any]]:
    """A folder with the import watcher, and a valid config's data for it: a real tiny model,
    a manifest and a validation image beside each config (relative paths)."""
    root = tmp_path_factory.mktemp("corpus")
    (root / "watch").mkdir()
    (root / "watch" / "sitecustomize.py").write_text(WATCH_IMPORTS, encoding="utf-8")
    valid = {
        "run_dir": "run",
        "model": {"source": str(tiny_models("sd15"))},
        "data": {"source": {"path": "train.jsonl"}},
        "validation": {"prompts": ["a red circle"], "images": ["val.png"]},
        "trainer": {"accelerator": "cpu", "devices": 1, "max_steps": 1},
    }
    return root, valid


def _write_case(root: Path, valid: dict[str, Any], case: Case, command: str) -> Path:
    """The case's config in a folder of its own, with the files the valid config names."""
    folder = root / f"{command}-{re.sub(r'[^a-z0-9]+', '-', case.name.lower())}"
    folder.mkdir()
    (folder / "train.jsonl").write_text(
        '{"image": "a.png", "conditioning_image": "b.png", "text": "x"}\n', encoding="utf-8"
    )
    (folder / "val.png").write_bytes(b"not read before launch")
    data = yaml.safe_load(yaml.safe_dump(valid))
    if case.edit is not None:
        case.edit(data)
    text = yaml.safe_dump(data, sort_keys=False)
    if case.text is not None:
        text = case.text(text)
    path = folder / "run.yaml"
    path.write_text(text, encoding="utf-8")
    return path


@attrs.frozen
class Outcome:
    code: int
    cpu_seconds: float
    wall_seconds: float
    err: str
    heavy: str
    """The heavy modules the process imported, one per line."""
    run_dir_made: bool


def _run(root: Path, config: Path, command: str, overrides: tuple[str, ...]) -> Outcome:
    """Run `cnet-train COMMAND CONFIG` and wait for it, timing its own CPU use (the wall clock
    of one process says little while other test runs share the two cores)."""
    marker = config.parent / "imported.txt"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(root / "watch"), os.environ.get("PYTHONPATH", "")]),
        "CNET_CORPUS_MARKER": str(marker),
    }
    argv = [*CLI, command, str(config), *(f"--set={item}" for item in overrides)]
    err_path = config.parent / f"{command}.err"
    start = time.monotonic()
    with err_path.open("w") as err_file:
        proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=err_file)
    killer = threading.Timer(WALL_LIMIT_S, proc.kill)
    killer.start()
    try:
        # os.wait4, not proc.wait: it also returns the child's own resource usage.
        _, status, usage = os.wait4(proc.pid, 0)
    finally:
        killer.cancel()
    proc.returncode = os.waitstatus_to_exitcode(status)
    heavy = marker.read_text(encoding="utf-8") if marker.exists() else ""
    return Outcome(
        code=proc.returncode,
        cpu_seconds=usage.ru_utime + usage.ru_stime,
        wall_seconds=time.monotonic() - start,
        err=err_path.read_text(encoding="utf-8"),
        heavy=heavy,
        run_dir_made=(config.parent / "run").exists(),
    )


def _judge(case: Case, command: str, outcome: Outcome) -> str:
    """What is wrong with how `command` handled `case` ("" if nothing)."""
    wrong = []
    if outcome.code != 2:
        wrong.append(f"exit code {outcome.code}, not 2")
    if outcome.cpu_seconds >= LIMIT_S:
        wrong.append(f"took {outcome.cpu_seconds:.1f} s of CPU")
    if outcome.wall_seconds >= WALL_LIMIT_S:
        wrong.append(f"was still running after {outcome.wall_seconds:.0f} s")
    first = outcome.err.splitlines()[0] if outcome.err else ""
    if not first.startswith(f"cnet-train {command}: error: "):
        wrong.append("no `cnet-train COMMAND: error:` line first")
    if case.key not in outcome.err:
        wrong.append(f"the message does not name {case.key}")
    if "Traceback" in outcome.err:
        wrong.append("a traceback was printed")
    if outcome.heavy:
        wrong.append(f"imported {outcome.heavy.split()}")
    if outcome.run_dir_made:
        wrong.append("the run directory was created")
    if not wrong:
        return ""
    return f"{command} / {case.name}: {'; '.join(wrong)}\n    stderr: {outcome.err[-600:]!r}"


@pytest.mark.slow
def test_every_malformed_config_is_refused_fast_by_config_and_launch(
    corpus_root: tuple[Path, dict[str, Any]],
) -> None:
    root, valid = corpus_root
    jobs = [
        (case, command, _write_case(root, valid, case, command))
        for case in CASES
        for command in ("config", "launch")
    ]
    # Two cores here: more parallel processes would only slow each one down.
    with ThreadPoolExecutor(max_workers=2) as pool:
        outcomes = list(pool.map(lambda job: _run(root, job[2], job[1], job[0].overrides), jobs))
    failures = [
        problem
        for (case, command, _), outcome in zip(jobs, outcomes, strict=True)
        if (problem := _judge(case, command, outcome))
    ]
    assert not failures, "\n".join(failures)
    cpu = max(o.cpu_seconds for o in outcomes)
    wall = max(o.wall_seconds for o in outcomes)
    print(f"{len(jobs)} refusals; the slowest took {cpu:.1f} s of CPU, {wall:.1f} s of wall clock")


def test_the_valid_config_of_the_corpus_passes(corpus_root: tuple[Path, dict[str, Any]]) -> None:
    # The control: each case above fails because of its one defect, not the rest.
    root, valid = corpus_root
    config = _write_case(root, valid, Case("control", ""), "config")
    outcome = _run(root, config, "config", ())
    assert outcome.code == 0, outcome.err
    assert not outcome.heavy and not outcome.run_dir_made


# --- in process: each check of `preflight`, on the demo's valid config


def _preflight_problems(
    config: TrainConfig, command: Command = "launch", **kw: Any
) -> tuple[str, ...]:
    with pytest.raises(ConfigError) as caught:
        preflight(config, command, **kw)
    return caught.value.problems


def test_the_demo_config_passes_preflight_for_every_command(make_config: MakeConfig) -> None:
    config = make_config()
    commands: tuple[Command, ...] = ("config", "launch", "embed")
    for command in commands:
        preflight(config, command)


def test_missing_and_misplaced_files_are_named(make_config: MakeConfig, tmp_path: Path) -> None:
    config = make_config()
    a_file = config.data.source.path
    problems = _preflight_problems(
        attrs.evolve(
            config,
            run_dir=a_file / "run",
            data=attrs.evolve(config.data, index=a_file / "index"),
            model=attrs.evolve(config.model, vae="./no-vae"),
            controlnet=attrs.evolve(config.controlnet, pretrained=str(tmp_path)),
            checkpoint=attrs.evolve(config.checkpoint, resume=str(tmp_path / "gone.ckpt")),
        )
    )
    assert problems[0] == f"data.index: cannot create {a_file / 'index'}: {a_file} is a file"
    assert problems[1] == f"run_dir: cannot create {a_file / 'run'}: {a_file} is a file"
    assert problems[2].startswith("model.vae: no-vae does not exist (a local folder")
    assert (
        problems[3]
        == f"controlnet.pretrained: {tmp_path} is not a diffusers folder (no config.json)"
    )
    assert problems[4].startswith(f"checkpoint.resume: {tmp_path / 'gone.ckpt'} does not exist")
    assert len(problems) == 5


def test_the_source_layout_must_match_its_format(make_config: MakeConfig) -> None:
    config = make_config()
    source = config.data.source
    as_folder = attrs.evolve(config.data, source=attrs.evolve(source, format="folder"))
    (problem,) = _preflight_problems(attrs.evolve(config, data=as_folder))
    assert problem == f"data.source.path: {source.path} is a file, but format is folder"
    folder = source.path.parent
    as_jsonl = attrs.evolve(config.data, source=attrs.evolve(source, path=folder, format="jsonl"))
    (problem,) = _preflight_problems(attrs.evolve(config, data=as_jsonl))
    assert problem == f"data.source.path: {folder} is a folder, but format is jsonl"


def test_a_built_index_needs_no_source(make_config: MakeConfig, tmp_path: Path) -> None:
    config = make_config()
    gone = attrs.evolve(config.data.source, path=tmp_path / "moved.jsonl")
    config = attrs.evolve(config, data=attrs.evolve(config.data, source=gone, index=tmp_path))
    assert _preflight_problems(config)[0].startswith("data.source.path: ")
    (tmp_path / "index.json").write_text("{}")
    preflight(config, "launch")


def test_the_cache_must_be_built_before_launch_but_not_before_embed(
    make_config: MakeConfig, tmp_path: Path
) -> None:
    config = make_config(cache=CacheConfig(path=tmp_path / "cache"))
    (problem,) = _preflight_problems(config, "launch")
    assert problem.startswith("cache.path: ") and "cnet-train embed" in problem
    preflight(config, "embed")


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("stabilityai/stable-diffusion-xl-base-1.0", None),  # a hub id: never fetched here
        ("runwayml", None),
        ("not a hub id!", "model.source: 'not a hub id!' is neither an existing folder nor"),
        ("a/b/c", "model.source: a/b/c does not exist (a local folder: no hub lookup is made)"),
        ("~/no-such-model-here", "model.source: "),
    ],
)
def test_model_sources_are_folders_or_hub_ids(
    make_config: MakeConfig, source: str, expected: str | None
) -> None:
    config = make_config()
    config = attrs.evolve(config, model=attrs.evolve(config.model, source=source))
    if expected is None:
        preflight(config, "launch")
    else:
        (problem,) = _preflight_problems(config)
        assert problem.startswith(expected)


def test_a_folder_that_is_not_a_model_is_named(make_config: MakeConfig, tmp_path: Path) -> None:
    config = make_config()
    config = attrs.evolve(config, model=attrs.evolve(config.model, source=str(tmp_path)))
    (problem,) = _preflight_problems(config)
    assert problem.startswith(f"model.source: {tmp_path} is not a diffusers model folder")


def test_devices_are_checked_against_the_machine(
    make_config: MakeConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(preflight_module, "_cpu_cores", lambda: 2)
    monkeypatch.setattr(preflight_module, "_cuda_devices", lambda: 0)
    config = make_config()

    def devices(
        accelerator: Literal["auto", "cpu", "gpu"], count: int | Literal["auto"]
    ) -> TrainConfig:
        trainer = attrs.evolve(config.trainer, accelerator=accelerator, devices=count)
        return attrs.evolve(config, trainer=trainer)

    preflight(devices("cpu", 2), "launch")
    (problem,) = _preflight_problems(devices("auto", 3))  # no CUDA: the CPU
    assert problem == (
        "trainer.devices: 3 CPU processes asked for, but this machine has 2 CPU cores; "
        "use at most 2, or auto"
    )
    # No CUDA: the accelerator itself is refused, by its key, whatever the device count.
    for gpu in (devices("gpu", 1), devices("gpu", "auto")):
        (problem,) = _preflight_problems(gpu)
        assert problem.startswith("trainer.accelerator: gpu asked for, but this machine has no")
    preflight(devices("cpu", 64), "embed")  # embed's processes come from its launcher
    monkeypatch.setattr(preflight_module, "_cuda_devices", lambda: 8)
    preflight(devices("auto", 8), "launch")
    assert _preflight_problems(devices("gpu", 9))[0].startswith("trainer.devices: 9 GPUs")


def test_a_path_meant_relative_to_the_cwd_gets_a_hint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_models: Callable[[str], Path]
) -> None:
    # The rule used to be the current directory: say so when that is where the file is.
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.jsonl").write_text("")
    (tmp_path / "org" / "model").mkdir(parents=True)
    (tmp_path / "configs").mkdir()
    config_file = tmp_path / "configs" / "run.yaml"
    config_file.write_text(
        "run_dir: run\nmodel: {source: org/model}\ndata: {source: {path: data/train.jsonl}}\n"
    )
    monkeypatch.chdir(tmp_path)
    config = load_config(config_file)
    problems = _preflight_problems(config, base_dir=config_file.parent)
    missing = tmp_path / "configs/data/train.jsonl"
    assert problems[0].startswith(
        f"data.source.path: {missing} does not exist (data/train.jsonl exists under the current "
        "directory, but a relative path in a config file is relative to the file's folder"
    )
    assert problems[1].startswith("model.source: 'org/model' is no folder next to the config file")
