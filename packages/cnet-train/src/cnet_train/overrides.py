"""Dotted command-line overrides (`--set optimizer.lr=1e-5`) applied to a config's raw mapping.

The key path is checked against the attrs schema before anything is set, so that a typo names
the path and the keys that exist there; the value is parsed as YAML (`1e-5`, `null`, `[a, b]`,
`{enabled: false}`, with the same bounded reader as the file) and then goes through the same
strict structuring as the file itself. A relative path given here is relative to the current
directory (`config_io.load_config` resolves it so).
"""

from __future__ import annotations

import difflib
import typing
from collections.abc import Sequence
from typing import Any

import attrs
import yaml

from cnet_train.conditioning_config import moved_key_message
from cnet_train.config_converter import shown
from cnet_train.config_yaml import load_yaml


class OverrideError(ValueError):
    """One override that cannot be applied; the message names its key path."""


def apply_overrides(data: dict[str, Any], overrides: Sequence[str], schema: type) -> list[str]:
    """Apply each `a.b.c=value` of `overrides` to `data` in order (in place); return the
    problems of those that could not be applied (the others are applied all the same)."""
    problems = []
    for item in overrides:
        try:
            keys, value = parse_override(item, schema)
            _set(data, keys, value)
        except OverrideError as exc:
            problems.append(str(exc))
    return problems


def parse_override(item: str, schema: type) -> tuple[list[str], object]:
    """The key path and the YAML-parsed value of `item`; the path is checked against `schema`."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise OverrideError(f"override {item!r}: expected KEY=VALUE, e.g. optimizer.lr=1e-5")
    keys = key.split(".")
    _check_path(keys, schema)
    try:
        value = load_yaml(raw)
    except yaml.YAMLError as exc:
        reason = str(exc).splitlines()[0]
        raise OverrideError(f"{key}: value {shown(raw)} is not valid YAML ({reason})") from exc
    return keys, value


def did_you_mean(key: object, valid: Sequence[str]) -> str:
    """` (did you mean x?)` when `key` is close to one of `valid`, else an empty string."""
    close = difflib.get_close_matches(str(key), valid, n=3)
    return f" (did you mean {' or '.join(close)}?)" if close else ""


def _check_path(keys: list[str], schema: type) -> None:
    section: type | None = schema
    for depth, name in enumerate(keys):
        where = ".".join(keys[:depth])
        if section is None:
            raise OverrideError(f"{'.'.join(keys)}: {where} is a value, not a section")
        hints = typing.get_type_hints(section)
        valid = [a.name for a in attrs.fields(section)]
        if name not in valid:
            moved = moved_key_message(".".join(keys[: depth + 1]))
            if moved is not None:  # a key of an earlier config: say where it went
                raise OverrideError(moved)
            level = f"in {where}" if where else "at the top level"
            raise OverrideError(
                f"{'.'.join(keys)}: unknown key {name!r}{did_you_mean(name, valid)}; "
                f"valid keys {level}: {', '.join(valid)}"
            )
        section = _section_type(hints[name])


def _section_type(tp: Any) -> type | None:
    """The attrs class a field of type `tp` holds (`X` or `X | None`), or None for a value."""
    if attrs.has(tp):
        return typing.cast(type, tp)
    options = [arg for arg in typing.get_args(tp) if arg is not type(None)]
    if len(options) == 1 and attrs.has(options[0]):
        return typing.cast(type, options[0])
    return None


def _set(data: dict[str, Any], keys: list[str], value: object) -> None:
    node = data
    for depth, name in enumerate(keys[:-1]):
        child = node.get(name)
        if child is None:
            # A section absent from the file (or written as null) is created by its override.
            child = node[name] = {}
        elif not isinstance(child, dict):
            where = ".".join(keys[: depth + 1])
            raise OverrideError(
                f"{'.'.join(keys)}: cannot set it, {where} is {shown(child)} in the file, "
                "not a section"
            )
        node = child
    node[keys[-1]] = value
