"""Checks of a structured config against this filesystem and this machine, made before anything
heavy is imported or loaded.

`cnet_train.config_io` checks what the config says (keys, types, ranges) and can run anywhere.
What it names must also be there: the dataset, the validation images, a local model folder, a
checkpoint to resume from, a writable run directory, as many devices as it asks for. Without
these checks each one fails only after the model has loaded (or, for a mistyped model folder,
after a minute of hub retries), with a message that names no key. `cnet-train config`, `launch`
and `embed` all call `preflight` first, so the first command refuses what the second would.

Kept apart from structuring because a config may be built before its files exist (the tests
write the dataset after building the config; a config may be checked on one machine and run on
another: `cnet-train config --schema-only`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from cnet_data.hf_rows import row_files
from cnet_data.sources import SourceConfig, SourceError
from cnet_data.tar_shards import shard_paths
from cnet_models.configs import is_hub_id, looks_local
from cnet_train.config import TrainConfig
from cnet_train.config_io import ConfigError, problems_error

Command = Literal["config", "launch", "embed", "encode"]

DEVICE_HINT = (
    "the trainer section is checked against the machine it runs on; check a config written "
    "for another machine with `cnet-train config --schema-only`"
)

PREFLIGHT_HINT = (
    "relative paths in a config file are relative to the file's folder; those given with "
    "--set, to the current directory"
)


def preflight(
    config: TrainConfig,
    command: Command,
    *,
    source: str = "<config>",
    base_dir: Path | None = None,
) -> None:
    """Raise one `ConfigError` listing every problem of `config` on this machine for `command`
    (`config` checks what `launch` needs); return if there is none. `base_dir` is the folder
    of the config file the paths were resolved against, if any (for the messages)."""
    problems = [
        *_data_problems(config, base_dir),
        *_writable_problems("run_dir", config.run_dir),
        *_cache_problems(config, command),
        *_latent_problems(config, command),
        *_validation_problems(config, base_dir),
        *_model_problems(config, base_dir),
        *_bucket_problems(config),
        *_resume_problems(config, base_dir),
    ]
    # embed's and encode's processes come from the launcher, not trainer.devices
    devices = _device_problems(config) if command not in ("embed", "encode") else []
    if problems or devices:
        hint = PREFLIGHT_HINT if problems else DEVICE_HINT
        raise problems_error(source, [*problems, *devices], hint=hint)


# --- files and folders


def _data_problems(config: TrainConfig, base_dir: Path | None) -> list[str]:
    """The dataset must be there, in the layout its format says, unless the index is already
    built (then the source is not read again)."""
    data = config.data
    index = data.index or config.run_dir / "index"
    if (index / "index.json").is_file():
        return []
    problems = [] if data.index is None else _writable_problems("data.index", data.index)
    source = data.source
    if source.url is not None:
        return problems  # the URL is read (or downloaded) when indexing, and checked then
    path = source.path
    if not path.exists():
        return [*problems, _missing("data.source.path", path, base_dir)]
    return [*problems, *_layout_problems(source)]


def _layout_problems(source: SourceConfig) -> list[str]:
    """What keeps an existing `data.source.path` from being read in its format's layout."""
    path, layout = source.path, source.resolved_format
    if layout in ("tar", "hf"):
        try:
            shard_paths(source) if layout == "tar" else row_files(source)
        except SourceError as exc:
            return [f"data.source.path: {exc}; {exc.hint}"]
        return []
    if layout != "folder":
        is_folder = f"data.source.path: {path} is a folder, but format is {layout}"
        return [] if path.is_file() else [is_folder]
    if not path.is_dir():
        return [f"data.source.path: {path} is a file, but format is folder"]
    return [
        f"{key}: {path / sub} is not a folder"
        for key, sub in (
            ("data.source.image_dir", source.image_dir),
            ("data.source.conditioning_dir", source.conditioning_dir),
        )
        if not (path / sub).is_dir()
    ]


def _cache_problems(config: TrainConfig, command: Command) -> list[str]:
    """`embed` writes the cache; `launch` reads it, so it must have been built."""
    return _built_cache_problems(
        "cache.path", config.cache.path, command, ("embed", "encode"), "captions"
    )


def _latent_problems(config: TrainConfig, command: Command) -> list[str]:
    """`encode` writes the latent cache; `launch` reads it, so it must have been built."""
    return _built_cache_problems(
        "latents.path", config.latents.path, command, ("encode", "embed"), "images"
    )


def _built_cache_problems(
    key: str, path: Path | None, command: Command, builders: tuple[Command, Command], what: str
) -> list[str]:
    """A cache's folder: writable for the command that builds it (`builders[0]`), present for
    every command that reads it; the other cache's builder (`builders[1]`) does not read it."""
    builder, other = builders
    if path is None or command == other:
        return []
    if command == builder:
        return _writable_problems(key, path)
    if path.is_dir():
        return []
    return [
        f"{key}: {path} does not exist; build it first with `cnet-train {builder} CONFIG`, "
        f"or set {key} to null to encode {what} in the training step"
    ]


def _validation_problems(config: TrainConfig, base_dir: Path | None) -> list[str]:
    problems = []
    for i, image in enumerate(config.validation.images):
        key = f"validation.images[{i}]"
        if not image.exists():
            problems.append(_missing(key, image, base_dir))
        elif not image.is_file():
            problems.append(f"{key}: {image} is a folder, not an image")
    return problems


def _model_problems(config: TrainConfig, base_dir: Path | None) -> list[str]:
    """Local folders must exist (and look like what they are meant to be); anything else must
    have the form of a hub id."""
    model = config.model
    if model.single_file:
        problems = _single_file_problems(model.source, base_dir)
        sources = [("model.config", model.config, _is_diffusers_folder)]
    else:
        problems, sources = [], [("model.source", model.source, _is_diffusers_folder)]
    sources += [
        ("model.vae", model.vae, _has_config),
        ("controlnet.pretrained", config.controlnet.pretrained, _has_config),
    ]
    return problems + [
        problem
        for key, source, complete in sources
        if source is not None
        for problem in _source_problems(key, source, complete, base_dir)
    ]


def _single_file_problems(source: str, base_dir: Path | None) -> list[str]:
    path = Path(source).expanduser()
    if path.suffix.lower() != ".safetensors":
        return [
            f"model.source: {source} is a {path.suffix} checkpoint; cnet reads single files as "
            ".safetensors only (a pickled checkpoint can run code when loaded)"
        ]
    if not path.is_file():
        return [_missing("model.source", path, base_dir) + " (a single-file checkpoint)"]
    return []


def _bucket_problems(config: TrainConfig) -> list[str]:
    """The keys `data.buckets` sets must make a table with the model family's defaults for the
    rest (the family may come from the model folder, so this needs the filesystem)."""
    from cnet_data.run_config import RunConfigError, run_buckets

    try:
        run_buckets(config.data.buckets, config.model.described_by, config.model.family)
    except RunConfigError as exc:
        return [f"data.buckets: {exc}"]
    return []


def _source_problems(
    key: str, source: str, complete: Callable[[Path], str], base_dir: Path | None
) -> list[str]:
    path = Path(source).expanduser()
    if _ambiguous(path, base_dir):
        return [
            f"{key}: {source!r} is no folder next to the config file ({base_dir}), so it reads "
            "as a hub id, but a folder of that name exists under the current directory; write "
            "its path relative to the file's folder (starting with ./ or ../), or an absolute one"
        ]
    if looks_local(source):
        if not path.exists():
            return [_missing(key, path, base_dir) + " (a local folder: no hub lookup is made)"]
        if not path.is_dir():
            return [f"{key}: {path} is a file, not a model folder"]
        lacking = complete(path)
        return [f"{key}: {path} {lacking}"] if lacking else []
    if not is_hub_id(source):
        return [f"{key}: {source!r} is neither an existing folder nor a hub id (org/name)"]
    return []


def _ambiguous(path: Path, base_dir: Path | None) -> bool:
    """Whether a source left relative (read from the file as a hub id: nothing of that name
    next to it) names a folder under the current directory, which loading would then take."""
    if base_dir is None or path.is_absolute() or base_dir == Path.cwd():
        return False
    return path.exists()


def _is_diffusers_folder(path: Path) -> str:
    if (path / "model_index.json").is_file() or (path / "unet").is_dir():
        return ""
    return "is not a diffusers model folder (no model_index.json and no unet/)"


def _has_config(path: Path) -> str:
    return "" if (path / "config.json").is_file() else "is not a diffusers folder (no config.json)"


def _resume_problems(config: TrainConfig, base_dir: Path | None) -> list[str]:
    resume = config.checkpoint.resume
    if resume in ("auto", "none") or Path(resume).expanduser().exists():
        return []
    return [_missing("checkpoint.resume", Path(resume), base_dir) + " (or use auto or none)"]


def _missing(key: str, path: Path, base_dir: Path | None) -> str:
    """`KEY: PATH does not exist`, and, when the path came from a config file and its relative
    form exists under the current directory instead, why (the rule before was the current
    directory)."""
    message = f"{key}: {path} does not exist"
    if base_dir is None or base_dir == Path.cwd():
        return message
    try:
        relative = path.relative_to(base_dir)
    except ValueError:
        return message
    if (Path.cwd() / relative).exists():
        message += (
            f" ({relative} exists under the current directory, but a relative path in a "
            f"config file is relative to the file's folder, {base_dir})"
        )
    return message


def _writable_problems(key: str, path: Path) -> list[str]:
    """`path` is, or can become, a folder this process writes in."""
    if path.exists():
        if not path.is_dir():
            return [f"{key}: {path} is a file, not a folder"]
        return [] if os.access(path, os.W_OK | os.X_OK) else [f"{key}: {path} is not writable"]
    parent = _existing_ancestor(path)
    if not parent.is_dir():
        return [f"{key}: cannot create {path}: {parent} is a file"]
    if not os.access(parent, os.W_OK | os.X_OK):
        return [f"{key}: cannot create {path}: {parent} is not writable"]
    return []


def _existing_ancestor(path: Path) -> Path:
    for parent in (path, *path.absolute().parents):
        if parent.exists():
            return parent
    return Path(path.absolute().anchor)


# --- devices


def _device_problems(config: TrainConfig) -> list[str]:
    """What the trainer section asks of this machine's devices, checked against what it has:
    Lightning's own refusals come late and name no key ("No supported gpu backend found!"),
    and too many CPU processes start (64 on two cores take 18 GB) and never take a step."""
    trainer = config.trainer
    gpus = _cuda_devices()
    if trainer.accelerator == "gpu" and not gpus:
        return [
            f"trainer.accelerator: gpu asked for, but {_machine(gpus)}; set "
            "trainer.accelerator to cpu (or auto) to train on the CPU, e.g. "
            "--set trainer.accelerator=cpu"
        ]
    on_gpu = trainer.accelerator == "gpu" or (trainer.accelerator == "auto" and gpus > 0)
    problems = [] if on_gpu else _cpu_precision_problems(config, gpus)
    devices = trainer.devices
    if devices == "auto":
        return problems
    if not on_gpu:
        cores = _cpu_cores()
        if devices > cores:
            problems.append(
                f"trainer.devices: {devices} CPU processes asked for, but this machine has "
                f"{cores} CPU core{'s' if cores != 1 else ''}; use at most {cores}, or auto"
            )
    elif devices > gpus:
        problems.append(
            f"trainer.devices: {devices} GPUs asked for, but this machine has {gpus} visible "
            "CUDA device" + ("s" if gpus != 1 else "") + " (check CUDA_VISIBLE_DEVICES); "
            f"use at most {gpus}, or auto"
        )
    return problems


def _cpu_precision_problems(config: TrainConfig, gpus: int) -> list[str]:
    """float16 autocast exists on CUDA only (Lightning refuses `16-mixed` on the CPU);
    bfloat16 autocast runs on the CPU, slowly, so `bf16-mixed` is allowed there."""
    if config.trainer.precision != "16-mixed":
        return []
    where = "trainer.accelerator is cpu" if config.trainer.accelerator == "cpu" else _machine(gpus)
    return [
        f"trainer.precision: 16-mixed needs a CUDA GPU, but {where}; set trainer.precision "
        "to 32 or bf16-mixed to train on the CPU, e.g. --set trainer.precision=32"
    ]


def _machine(gpus: int) -> str:
    """What this machine has, for a message: its visible CUDA devices and CPU cores."""
    import torch

    cores = _cpu_cores()
    cpus = f"{cores} CPU core{'s' if cores != 1 else ''}"
    if gpus:
        return f"this machine has {gpus} CUDA device{'s' if gpus != 1 else ''} and {cpus}"
    if torch.version.cuda is None:
        return (
            f"this machine has no CUDA GPU (torch {torch.__version__} is built without CUDA) "
            f"and {cpus}"
        )
    return (
        f"this machine has no visible CUDA GPU (check the driver and CUDA_VISIBLE_DEVICES) "
        f"and {cpus}"
    )


def _cpu_cores() -> int:
    """The cores this process may run on (a container or a scheduler may allow fewer than
    the machine has)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def _cuda_devices() -> int:
    """Visible CUDA devices; counting them does not create a CUDA context."""
    import torch

    return int(torch.cuda.device_count())


__all__ = ["DEVICE_HINT", "PREFLIGHT_HINT", "Command", "ConfigError", "preflight"]
