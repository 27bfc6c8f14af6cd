"""Reading a training config's YAML strictly and checking its sections field by field.

The cnet-data commands read the `data:` section of `cnet-train`'s config without cnet-train
(`cnet_data.run_config`), so the checks cnet-train's loader makes of those fields are made
here too: a key given twice, nesting too deep, an unknown key (with the closest valid one), a
value of the wrong type or out of range, each reported under its dotted key.
"""

from __future__ import annotations

import math
import types
import typing
from collections.abc import Callable, Sequence
from difflib import get_close_matches
from pathlib import Path
from typing import Any, Literal

import attrs
import yaml
from typing_extensions import override
from yaml.nodes import MappingNode, Node, ScalarNode

from cnet_data.errors import CnetError
from cnet_data.scan import ScanConfig
from cnet_data.sources import SourceConfig

MAX_FILE_BYTES = 16 * 2**20
"""Largest config file read: a config is a few kilobytes; a huge file is a mistake."""
MAX_DEPTH = 64
"""Deepest nesting of lists and mappings read (a config needs about five)."""
CONFIG_HINT = "fix the keys named above (`cnet-train config FILE` checks the whole file)"
_MERGE_TAG = "tag:yaml.org,2002:merge"


class RunConfigError(CnetError, ValueError):
    """A training config the cnet-data commands cannot use; `problems` holds one line per
    problem, each starting with its dotted key (empty when the file itself is the problem)."""

    exit_code = 2

    def __init__(self, message: str, problems: Sequence[str] = (), *, hint: str = CONFIG_HINT):
        super().__init__(message, hint=hint)
        self.problems = tuple(problems)


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader that refuses a key given twice (the plain loader silently keeps the
    last) and nesting deeper than `MAX_DEPTH` (which would end in a `RecursionError`)."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    @override
    def compose_node(self, parent: Node | None, index: Any) -> Node | None:
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                mark = self.peek_event().start_mark  # type: ignore[no-untyped-call]
                raise yaml.YAMLError(
                    f"nested deeper than {MAX_DEPTH} levels (line {mark.line + 1})"
                )
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    @override
    def construct_mapping(self, node: MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[tuple[str, str], int] = {}
        for key, _ in node.value:
            if not isinstance(key, ScalarNode) or key.tag == _MERGE_TAG:
                continue
            line = key.start_mark.line + 1
            first = seen.setdefault((key.tag, key.value), line)
            if first != line:
                raise yaml.YAMLError(
                    f"key {key.value!r} given twice (line {first} and line {line}); keep one"
                )
        return super().construct_mapping(node, deep=deep)


def read_mapping(path: Path) -> dict[Any, Any]:
    """The top-level mapping of the YAML file `path`."""
    try:
        if path.stat().st_size > MAX_FILE_BYTES:
            raise RunConfigError(f"config file {path} is larger than 16 MiB; is it the right file?")
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RunConfigError(
            f"config file {path} does not exist",
            hint="give the training config (RUN.yaml) that `cnet-train launch` reads",
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RunConfigError(f"config file {path} cannot be read: {exc}") from exc
    loader = _StrictLoader(text)
    try:
        data = loader.get_single_data()
    except yaml.YAMLError as exc:
        raise RunConfigError(f"config file {path} is not valid YAML: {exc}") from exc
    finally:
        loader.dispose()
    if not isinstance(data, dict):
        raise RunConfigError(
            f"config file {path} must hold a mapping of keys (run_dir, model, data, ...), "
            f"got {shown(data)}"
        )
    return data


def mapping_section(
    value: object, key: str, problems: list[str], *, required: bool = False
) -> dict[Any, Any]:
    """`value` if it is a mapping; else {} and a problem (a missing optional section is {})."""
    if isinstance(value, dict):
        return value
    if value is None and not required:
        return {}
    problems.append(
        f"{key}: required key is missing"
        if value is None
        else f"{key}: expected a mapping of keys, got {shown(value)}"
    )
    return {}


def checked_fields(
    cls: type[Any], value: object, key: str, problems: list[str], *, required: bool = False
) -> dict[str, Any]:
    """The keys of the mapping `value` that are valid fields of the attrs class `cls`, values
    converted (a path string to `Path`); every unknown, missing, mistyped or out-of-range key is
    added to `problems` under `key`."""
    if value is None and not required:
        problems.append(f"{key}: expected a mapping of keys, got null")
        return {}
    if not isinstance(value, dict):
        mapping_section(value, key, problems, required=required)  # says what is there instead
        return {}
    given = value
    hints = typing.get_type_hints(cls)
    names = [field.name for field in attrs.fields(cls)]
    valid: dict[str, Any] = {}
    for name, item in given.items():
        dotted = f"{key}.{name}"
        if name not in names:
            problems.append(unknown_key(key, name, names))
            continue
        problem = type_problem(item, hints[name]) or _value_problem(cls, name, item)
        if problem is not None:
            problems.append(f"{dotted}: {problem}")
            continue
        valid[name] = Path(item) if hints[name] is Path else item
    for field in attrs.fields(cls):
        if field.default is attrs.NOTHING and field.name not in given:
            problems.append(f"{key}.{field.name}: required key is missing")
    return valid


def type_problem(value: object, expected: Any) -> str | None:
    """What is wrong with the type of `value` for a field typed `expected`, or None."""
    origin = typing.get_origin(expected)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(expected)
        if value is None and type(None) in options:
            return None
        others = [option for option in options if option is not type(None)]
        if len(others) != 1:
            raise TypeError(f"no check for a field of type {expected}")
        return type_problem(value, others[0])
    if origin is Literal:
        choices = typing.get_args(expected)
        if any(type(value) is type(c) and value == c for c in choices):
            return None
        return f"must be one of {', '.join(map(repr, choices))}, got {shown(value)}"
    names: dict[Any, tuple[type | tuple[type, ...], str]] = {
        Path: (str, "a path (a string)"),
        str: (str, "a string"),
        int: (int, "an integer"),
        float: ((int, float), "a number"),
        bool: (bool, "true or false"),
    }
    if expected not in names:
        raise TypeError(f"no check for a field of type {expected}")
    kind, wanted = names[expected]
    if isinstance(value, kind) and (expected is bool or not isinstance(value, bool)):
        return None
    return f"expected {wanted}, got {shown(value)}"


def non_empty(value: Any) -> str | None:
    return "must not be empty" if value == "" else None


def _sub_folder(value: Any) -> str | None:
    # Joined to the dataset root: an absolute path or `..` would leave it.
    parts = Path(value).parts
    if not value or Path(value).is_absolute() or ".." in parts:
        return f"must be a folder inside the dataset root, got {value!r}"
    return None


def _cache_bound(value: Any) -> str | None:
    ok = isinstance(value, int | float) and math.isfinite(value) and value >= 0
    return None if ok else f"must be a finite number of GiB >= 0, got {value}"


def _at_least(minimum: int) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        return f"must be at least {minimum}, got {value}" if value < minimum else None

    return check


_VALUE_CHECKS: dict[tuple[type, str], Callable[[Any], str | None]] = {
    (SourceConfig, "path"): non_empty,
    (SourceConfig, "image_key"): non_empty,
    (SourceConfig, "conditioning_key"): non_empty,
    (SourceConfig, "caption_key"): non_empty,
    (SourceConfig, "caption_suffix"): non_empty,
    (SourceConfig, "conditioning_extension"): non_empty,
    (SourceConfig, "split"): non_empty,
    (SourceConfig, "read_cache_gib"): _cache_bound,
    (SourceConfig, "image_dir"): _sub_folder,
    (SourceConfig, "conditioning_dir"): _sub_folder,
    (ScanConfig, "max_pixels"): _at_least(1),
    (ScanConfig, "workers"): _at_least(0),
}
"""The range checks cnet-train makes of these fields (its `FOREIGN_CHECKS`), so that a config
cnet-data accepts is one the launch accepts too."""


def _value_problem(cls: type, name: str, value: Any) -> str | None:
    check = _VALUE_CHECKS.get((cls, name))
    return check(value) if check is not None else None


def path_value(value: object, key: str, base: Path, problems: list[str]) -> Path | None:
    if value is None:
        return None
    problem = type_problem(value, Path) or non_empty(value)
    if problem is not None:
        problems.append(f"{key}: {problem}")
        return None
    assert isinstance(value, str)
    return absolute(Path(value), base)


def absolute(path: Path, base: Path) -> Path:
    path = path.expanduser()
    return path if path.is_absolute() else base / path


def unknown_key(section: str, key: object, valid: Sequence[str]) -> str:
    close = get_close_matches(str(key), valid, n=1)
    hint = f" (did you mean {close[0]}?)" if close else f" (valid keys: {', '.join(valid)})"
    return f"{section}.{key}: unknown key{hint}"


def shown(value: object) -> str:
    if value is None:
        return "null"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
