"""Loading a `TrainConfig` from YAML (with `--set` overrides) and writing it back.

Everything here only reads and checks the config: a wrong key, type or value fails with one
`ConfigError` that lists every problem, each under its dotted key path, before any model,
dataset or device is touched. (What needs the filesystem or the machine, such as whether a
path exists, is checked next by `cnet_train.preflight`.) The YAML is read by
`cnet_train.config_yaml`, which bounds nesting and alias expansion and refuses duplicate keys.

Relative paths in a config file are relative to the file's folder, wherever the command runs
from: `load_config` makes them absolute against it (`~` is expanded). Paths given with
`--set` are relative to the current directory, where the person typing them is. That covers
`run_dir`, `data.source.path`, `data.index`, `cache.path`, `validation.images`, a
`checkpoint.resume` path, and those of `model.source`, `model.vae` and
`controlnet.pretrained` that name a folder rather than a hub id (`cnet_models.configs.
looks_local`). `config_from_dict`, which has no file, resolves nothing unless given a folder.

Float fields also take strings that read as numbers: PyYAML (YAML 1.1) reads `lr: 3e-5` as
the string '3e-5' because its float pattern needs a dot (`3.0e-5`), and refusing what every
other tool reads as a number would only confuse. Every other scalar must have its exact type.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import attrs
import yaml
from cattrs.errors import (
    ClassValidationError,
    ForbiddenExtraKeysError,
    IterableValidationError,
)

from cnet_data.atomic import atomic_write_text
from cnet_data.errors import CnetError
from cnet_models.configs import looks_local
from cnet_train.conditioning_config import moved_key_message
from cnet_train.config import TrainConfig
from cnet_train.config_converter import config_converter
from cnet_train.config_yaml import MAX_DEPTH, YAMLLimitError, load_yaml
from cnet_train.overrides import apply_overrides, did_you_mean

CONFIG_FILE_NAME = "config.yaml"
MAX_FILE_BYTES = 16 * 2**20
"""Largest config file read: a config is a few kilobytes; a huge file is a mistake."""
CONFIG_HINT = (
    "fix the keys named above; `cnet-train config FILE` checks a file in seconds, "
    "without loading a model"
)

PATH_KEYS = (
    "run_dir",
    "data.source.path",
    "data.index",
    "cache.path",
    "latents.path",
    "validation.images",
)
"""Path fields: made absolute against the config file's folder (or the current directory)."""
SOURCE_KEYS = ("model.source", "model.config", "model.vae", "controlnet.pretrained")
"""Folder-or-hub-id fields: made absolute only when they name a folder."""
RESUME_KEY = "checkpoint.resume"
"""`auto`, `none`, or a path (made absolute)."""


class ConfigError(CnetError, ValueError):
    """A config that cannot be used; `problems` holds one line per problem, each starting with
    its dotted key (may be empty when the file itself is the problem: missing, unreadable, not
    YAML, not a mapping). A `ValueError` too, for callers that catch bad input as such."""

    exit_code = 2

    def __init__(self, message: str, problems: Sequence[str] = (), *, hint: str = CONFIG_HINT):
        super().__init__(message, hint=hint)
        self.problems = tuple(problems)


def problems_error(source: str, problems: Sequence[str], *, hint: str = CONFIG_HINT) -> ConfigError:
    """One `ConfigError` whose message lists every problem, one per line."""
    lines = "\n".join(f"  {p}" for p in problems)
    count = f"{len(problems)} problem{'s' if len(problems) != 1 else ''}"
    return ConfigError(f"invalid config {source} ({count}):\n{lines}", problems, hint=hint)


def load_config(path: Path, overrides: Sequence[str] = ()) -> TrainConfig:
    """The config in the YAML file `path`, with `overrides` (`a.b.c=value`) applied; relative
    paths of the file are resolved against its folder, those of `overrides` against the
    current directory."""
    path = Path(path)
    return config_from_dict(
        _read_mapping(path), overrides, source=str(path), base_dir=path.parent.absolute()
    )


def config_from_dict(
    data: Mapping[str, Any],
    overrides: Sequence[str] = (),
    *,
    source: str = "<dict>",
    base_dir: Path | None = None,
) -> TrainConfig:
    """The config in `data` (as read from YAML; not modified), with `overrides` applied.

    With `base_dir`, relative paths of `data` are made absolute against it and those of
    `overrides` against the current directory; without, every path stays as written."""
    raw = _deep_copy(data, source)
    problems = apply_overrides(raw, overrides, TrainConfig)
    config = None
    try:
        config = config_converter().structure(raw, TrainConfig)
    except (ClassValidationError, IterableValidationError) as exc:
        problems += _problems(exc, "")
    if problems or config is None:
        raise problems_error(source, problems)
    if base_dir is None:
        return config
    overridden = {item.partition("=")[0].strip() for item in overrides}
    return resolve_paths(config, Path(base_dir), overridden)


def resolve_paths(config: TrainConfig, base_dir: Path, overridden: set[str]) -> TrainConfig:
    """`config` with its relative paths made absolute: against `base_dir`, or against the
    current directory for a key that is in `overridden` or lies under one that is."""
    cwd = Path.cwd()
    for key in (*PATH_KEYS, *SOURCE_KEYS, RESUME_KEY):
        parts = key.split(".")
        prefixes = {".".join(parts[: i + 1]) for i in range(len(parts))}
        root = cwd if prefixes & overridden else base_dir
        config = _replace(config, parts, partial(_resolved, key, root))
    return config


def _replace(section: Any, keys: list[str], change: Callable[[Any], Any]) -> Any:
    """`section` with the value at the key path `keys` replaced by `change(value)`."""
    value = getattr(section, keys[0])
    new = change(value) if len(keys) == 1 else _replace(value, keys[1:], change)
    return section if new is value else attrs.evolve(section, **{keys[0]: new})


def _resolved(key: str, root: Path, value: Any) -> Any:
    """The value of `key` with a relative path in it made absolute against `root`."""
    if value is None:
        return None
    if isinstance(value, tuple):
        return tuple(_absolute(Path(item), root) for item in value)
    if isinstance(value, Path):
        return _absolute(value, root)
    if key == RESUME_KEY:
        return value if value in ("auto", "none") else str(_absolute(Path(value), root))
    return str(_absolute(Path(value), root)) if looks_local(value, root) else value


def _absolute(path: Path, root: Path) -> Path:
    path = path.expanduser()
    return path if path.is_absolute() else root / path


def config_to_dict(config: TrainConfig) -> dict[str, Any]:
    """Plain data (paths as strings, tuples as lists) in schema order; loads back as `config`."""
    data = config_converter().unstructure(config, TrainConfig)
    assert isinstance(data, dict)
    return data


def dump_config(config: TrainConfig) -> str:
    """`config` as YAML, every key written (defaults too) in schema order."""
    data = config_to_dict(config)
    text = _yaml(data, allow_unicode=True)
    # Non-ASCII text is written as is, for prompts a person can read; but PyYAML then writes a
    # NEL character (U+0085) raw inside quotes and reads it back as a space, so a dump that
    # does not read back the same is written again with escapes.
    return text if yaml.safe_load(text) == data else _yaml(data, allow_unicode=False)


def _yaml(data: dict[str, Any], *, allow_unicode: bool) -> str:
    return yaml.safe_dump(
        data, sort_keys=False, allow_unicode=allow_unicode, default_flow_style=False
    )


def write_resolved_config(config: TrainConfig, run_dir: Path) -> Path:
    """Write `run_dir/config.yaml` atomically (temporary file, then rename); return its path."""
    path = Path(run_dir) / CONFIG_FILE_NAME
    atomic_write_text(path, dump_config(config))
    return path


def _read_mapping(path: Path) -> dict[str, Any]:
    try:
        if path.stat().st_size > MAX_FILE_BYTES:
            raise ConfigError(
                f"config file {path} is larger than {MAX_FILE_BYTES // 2**20} MiB: "
                "a config is a few kilobytes; is this the right file?"
            )
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc}") from exc
    try:
        data = load_yaml(text)
    except YAMLLimitError as exc:
        raise problems_error(str(path), [str(exc)]) from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        got = "an empty file" if data is None else f"{type(data).__name__} {_short(data)}"
        raise ConfigError(
            f"config file {path} must hold a mapping of keys (run_dir, model, data, ...), got {got}"
        )
    return data


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _deep_copy(value: Any, source: str, depth: int = 0) -> Any:
    """A copy of the nested mappings and lists of `value`. Overrides edit nested mappings in
    place and the caller's data must not change. The depth bound matters for data built in
    memory (YAML files are bounded as they are read): it turns a cycle or absurd nesting into a
    `ConfigError` rather than a `RecursionError`."""
    if depth > MAX_DEPTH:
        raise ConfigError(f"invalid config {source}: nested deeper than {MAX_DEPTH} levels")
    if isinstance(value, Mapping):
        return {key: _deep_copy(item, source, depth + 1) for key, item in value.items()}
    if isinstance(value, list):
        return [_deep_copy(item, source, depth + 1) for item in value]
    return value


def _problems(exc: BaseException, path: str) -> list[str]:
    """One `path: message` line per leaf of cattrs' detailed-validation error tree (what
    cattrs' `transform_error` does, with dotted key paths and messages of our own)."""
    if isinstance(exc, ClassValidationError):
        with_notes, without = exc.group_exceptions()
        found = [p for sub, note in with_notes for p in _problems(sub, _join(path, note.name))]
        return found + [p for sub in without for p in _problems(sub, path)]
    if isinstance(exc, IterableValidationError):
        with_index, without = exc.group_exceptions()
        found = [p for sub, note in with_index for p in _problems(sub, f"{path}[{note.index}]")]
        return found + [p for sub in without for p in _problems(sub, path)]
    if isinstance(exc, ForbiddenExtraKeysError):
        valid = [a.name for a in attrs.fields(exc.cl)]
        return [_unknown_key(path, key, valid) for key in sorted(exc.extra_fields, key=str)]
    if isinstance(exc, KeyError):
        # cattrs' generated code indexes the mapping for a required key: the key is missing.
        return [f"{path}: required key is missing"]
    return [f"{path or '(top level)'}: {exc}"]


def _unknown_key(path: str, key: object, valid: list[str]) -> str:
    moved = moved_key_message(_join(path, str(key)))
    if moved is not None:  # a key of an earlier config: say where it went
        return moved
    hint = did_you_mean(key, valid) or f" (valid keys: {', '.join(valid)})"
    return f"{_join(path, str(key))}: unknown key{hint}"


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name
