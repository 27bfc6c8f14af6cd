"""Loading a `TrainConfig` from YAML (with `--set` overrides) and writing it back.

Everything here only reads and checks the config: a wrong key or type fails with one
`ConfigError` that lists every problem, each under its dotted key path, before any model,
dataset or device is touched. Relative paths are kept as written (relative to the current
directory when they are used).

Float fields also take strings that read as numbers: PyYAML (YAML 1.1) reads `lr: 3e-5` as
the string '3e-5' because its float pattern needs a dot (`3.0e-5`), and refusing what every
other tool reads as a number would only confuse. Every other scalar must have its exact type.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
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
from cnet_train.config import TrainConfig
from cnet_train.config_converter import config_converter
from cnet_train.overrides import apply_overrides, did_you_mean

CONFIG_FILE_NAME = "config.yaml"


class ConfigError(ValueError):
    """A config that cannot be used; `problems` holds one line per problem (may be empty when
    the file itself is the problem: missing, unreadable, not YAML, not a mapping)."""

    def __init__(self, message: str, problems: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.problems = tuple(problems)


def load_config(path: Path, overrides: Sequence[str] = ()) -> TrainConfig:
    """The config in the YAML file `path`, with `overrides` (`a.b.c=value`) applied."""
    return config_from_dict(_read_mapping(Path(path)), overrides, source=str(path))


def config_from_dict(
    data: Mapping[str, Any], overrides: Sequence[str] = (), *, source: str = "<dict>"
) -> TrainConfig:
    """The config in `data` (as read from YAML; not modified), with `overrides` applied."""
    raw = _deep_copy(data)
    problems = apply_overrides(raw, overrides, TrainConfig)
    config = None
    try:
        config = config_converter().structure(raw, TrainConfig)
    except (ClassValidationError, IterableValidationError) as exc:
        problems += _problems(exc, "")
    if problems or config is None:
        lines = "\n".join(f"  {p}" for p in problems)
        count = f"{len(problems)} problem{'s' if len(problems) != 1 else ''}"
        raise ConfigError(f"invalid config {source} ({count}):\n{lines}", problems)
    return config


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
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc}") from exc
    try:
        data = yaml.safe_load(text)
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


def _deep_copy(value: Any) -> Any:
    # Overrides edit nested mappings in place; the caller's data must not change.
    if isinstance(value, Mapping):
        return {key: _deep_copy(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_deep_copy(item) for item in value]
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
    hint = did_you_mean(key, valid) or f" (valid keys: {', '.join(valid)})"
    return f"{_join(path, str(key))}: unknown key{hint}"


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name
