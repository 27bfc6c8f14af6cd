"""The cnet-data part of a training config, for `cnet-data index|check|buckets --config RUN.yaml`.

A run is described by one YAML file (`cnet-train launch RUN.yaml`) whose `data:` section already
says where the dataset is, how its manifest keys are named, how strictly it is scanned and how it
is bucketed. Typing all of that again as flags invites the two to drift apart, so the commands
read the file. cnet-data installs without cnet-train, so this module reads the section itself,
the way cnet-train does:

- `data.source`, `data.scan` and `data.buckets` hold the fields of `SourceConfig`, `ScanConfig`
  and `BucketConfig`. A section left out takes cnet-train's default for it (for `scan` that is
  `ScanConfig(on_bad="skip")`, what the launch uses); a section given takes the class's own
  defaults for the keys it leaves out (so `scan: {workers: 8}` means `on_bad: fail`), exactly
  as cnet-train structures it.
- `data.index` (default RUN_DIR/index) is where `index` writes and `buckets` reads.
- Relative paths (`run_dir`, `data.source.path`, `data.index`, a local `model.source`) are
  relative to the YAML file's folder, wherever the command runs from; `~` is expanded.
- An unknown key in `data` or in the sections read, a value of the wrong type or range, or a
  key given twice is refused, every problem under its dotted key. The sections cnet-data does
  not use (optimizer, trainer, the rest of `model`, ...) are left to `cnet-train config`.
- The model family (which sets the bucket defaults) is `model.family`, else what the local model
  folder's `unet/config.json` shows (read as plain JSON with the rule of
  `cnet_models.families.detect_family`), else unknown.
- The bucket table is `data.buckets`' keys over the family's defaults over `BucketConfig`'s
  (`resolve_buckets`). Training resolves its buckets with these same functions
  (`cnet_train.data.run_buckets`), so that `cnet-data buckets --config RUN.yaml` shows the
  table the launch trains on.
"""

from __future__ import annotations

import json
import math
import os
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from difflib import get_close_matches
from pathlib import Path
from typing import Any, Literal

import attrs
import yaml
from typing_extensions import override
from yaml.nodes import MappingNode, Node, ScalarNode

from cnet_data.buckets import FAMILY_RESOLUTIONS, BucketConfig, BucketSettings
from cnet_data.errors import CnetError
from cnet_data.scan import ScanConfig
from cnet_data.sources import SourceConfig

DATA_KEYS = (
    "source",
    "index",
    "scan",
    "buckets",
    "augment",
    "batch_size",
    "num_workers",
    "prefetch_factor",
    "pin_memory",
    "caption_dropout",
    "caption_dropout_embedding",
)
"""The keys of cnet-train's `DataConfig` (a test keeps them in step): any other key in `data`
is a mistake, most likely a misspelling."""
DEFAULT_SCAN = ScanConfig(on_bad="skip")
"""`data.scan` when the config leaves the section out: the launch indexes what it can."""
MAX_FILE_BYTES = 16 * 2**20
"""Largest config file read: a config is a few kilobytes; a huge file is a mistake."""
MAX_DEPTH = 64
"""Deepest nesting of lists and mappings read (a config needs about five)."""
MAX_UNET_CONFIG_BYTES = 2**20
"""Largest `unet/config.json` read for the family (a real one is about two kilobytes)."""
CONFIG_HINT = "fix the keys named above (`cnet-train config FILE` checks the whole file)"
_MERGE_TAG = "tag:yaml.org,2002:merge"


class RunConfigError(CnetError, ValueError):
    """A training config the cnet-data commands cannot use; `problems` holds one line per
    problem, each starting with its dotted key (empty when the file itself is the problem)."""

    exit_code = 2

    def __init__(self, message: str, problems: Sequence[str] = (), *, hint: str = CONFIG_HINT):
        super().__init__(message, hint=hint)
        self.problems = tuple(problems)


@attrs.frozen
class ModelFamily:
    """What the config (or its local model folder) says about the base model's family."""

    name: str | None
    """`sd15`, `sd21` or `sdxl`; None when neither the config nor a model folder tells."""
    resolution: int | None
    """Side of the square resolution that family's base model was trained at; None if unknown."""
    reason: str
    """How the family was found, or why it was not: said in the command's output."""


@attrs.frozen
class RunDataConfig:
    """The parts of a training config the cnet-data commands use, with paths made absolute."""

    file: Path
    """The YAML file read."""
    source: SourceConfig
    """`data.source`."""
    scan: ScanConfig
    """`data.scan`, or `DEFAULT_SCAN` when the section is left out."""
    buckets: Mapping[str, int]
    """The keys `data.buckets` sets (a null one is not set); those it leaves out come from the
    family or BucketConfig."""
    index: Path | None
    """`data.index`, else RUN_DIR/index; None when the config sets neither."""
    family: ModelFamily
    """The base model's family, which sets the bucket defaults."""


def load_run_config(path: Path) -> RunDataConfig:
    """The cnet-data parts of the training config in `path`; raises `RunConfigError` naming
    every problem of those parts at once."""
    path = Path(path)
    raw = _read_mapping(path)
    base = path.parent.absolute()
    problems: list[str] = []
    data = _mapping(raw.get("data"), "data", problems, required=True)
    for key in data:
        if key not in DATA_KEYS:
            problems.append(_unknown_key("data", key, DATA_KEYS))
    source = _fields(SourceConfig, data.get("source"), "data.source", problems, required=True)
    scan = _fields(ScanConfig, data.get("scan", {}), "data.scan", problems)
    known = len(problems)
    buckets = _fields(BucketSettings, data.get("buckets", {}), "data.buckets", problems)
    buckets = {key: value for key, value in buckets.items() if value is not None}
    buckets_read = len(problems) == known
    index = _path_value(data.get("index"), "data.index", base, problems)
    run_dir = _path_value(raw.get("run_dir"), "run_dir", base, problems)
    model = _mapping(raw.get("model"), "model", problems)
    family = _family(model, base, problems)
    if buckets_read:  # each key is fine: do they make a table with the family's defaults?
        _check_buckets(buckets, family, problems)
    if problems:
        count = f"{len(problems)} problem{'s' if len(problems) != 1 else ''}"
        lines = "\n".join(f"  {p}" for p in problems)
        raise RunConfigError(f"invalid config {path} ({count}):\n{lines}", problems)
    source["path"] = _absolute(source["path"], base)
    return RunDataConfig(
        file=path,
        source=SourceConfig(**source),
        scan=ScanConfig(**scan) if "scan" in data else DEFAULT_SCAN,
        buckets=buckets,
        index=index if index is not None else (run_dir / "index" if run_dir else None),
        family=family,
    )


@attrs.frozen
class ResolvedBuckets:
    """The bucket table's settings of a run, and where its area came from."""

    config: BucketConfig
    """Every key: the config's, else the family's default, else BucketConfig's."""
    origin: str
    """Where the area came from (the config, a flag, the family or the default), and, for the
    default of an unknown family, why the family is unknown and how to set it."""

    @property
    def area(self) -> str:
        """The area as pixels and, for a square one, its side: `262144 (512x512)`."""
        return _area(self.config.area)

    def line(self) -> str:
        """One line for the user: `bucket area 262144 (512x512): the sd15 default (...)`."""
        return f"bucket area {self.area}: {self.origin}"


def resolve_buckets(
    given: Mapping[str, int], family: ModelFamily | None, *, flags: Sequence[str] = ()
) -> ResolvedBuckets:
    """The bucket table's settings, and where its area came from.

    Precedence per field: `given` (the config's `data.buckets` and, over it, the flags, whose
    names are in `flags`), then the family's default (`BucketConfig.for_resolution`) when the
    family is known, then `BucketConfig`'s own defaults (SDXL's). Raises `RunConfigError` when
    the keys given do not make a table with the defaults of the others."""
    try:
        config = BucketConfig(**{**_family_defaults(given, family), **given})
    except ValueError as exc:
        raise RunConfigError(
            f"bucket settings {dict(given)} do not fit: {exc}",
            hint="set data.buckets.area, min_side and max_side (or --area, --min-side, "
            "--max-side) together",
        ) from exc
    return ResolvedBuckets(config, _area_origin(given, family, flags))


def run_buckets(
    settings: BucketSettings, source: str | None, family: str | None, base: Path | None = None
) -> ResolvedBuckets:
    """The bucket settings of a training run whose config holds `data.buckets` (`settings`),
    `model.source` and `model.family`: what the launch trains on (`cnet_train.data.run_buckets`
    and the preflight call this). A relative model folder is relative to `base`, by default
    the current directory (where the launch loads it from)."""
    found = model_family(source, family, Path.cwd() if base is None else base)
    return resolve_buckets(settings.given(), found)


def bucket_config(
    given: Mapping[str, int], family: ModelFamily | None, *, flags: Sequence[str] = ()
) -> tuple[BucketConfig, str]:
    """`resolve_buckets` as the settings and the line that says where the area came from."""
    resolved = resolve_buckets(given, family, flags=flags)
    return resolved.config, resolved.line()


def _family_defaults(given: Mapping[str, int], family: ModelFamily | None) -> dict[str, int]:
    """The family's bucket settings for the step in use; {} when the family is unknown."""
    if family is None or family.resolution is None:
        return {}
    step = given.get("step", BucketConfig().step)
    return attrs.asdict(BucketConfig.for_resolution(family.resolution, step))


def _area(area: int) -> str:
    side = math.isqrt(area)
    return f"{area} ({side}x{side})" if side * side == area else f"{area} pixels"


def _area_origin(given: Mapping[str, int], family: ModelFamily | None, flags: Sequence[str]) -> str:
    if "area" in flags:
        return "set by --area"
    if "area" in given:
        return "data.buckets.area of the config"
    if family is None:
        return "the default (SDXL's); --area sets another"
    if family.name is not None:
        return f"the {family.name} default ({family.reason}); data.buckets.area sets another"
    return (
        f"the default (SDXL's): the model family is unknown ({family.reason}); "
        "set model.family or data.buckets.area"
    )


# -- reading the file -------------------------------------------------------------------------


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


def _read_mapping(path: Path) -> dict[Any, Any]:
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
            f"got {_shown(data)}"
        )
    return data


# -- checking the sections ----------------------------------------------------------------------


def _mapping(
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
        else f"{key}: expected a mapping of keys, got {_shown(value)}"
    )
    return {}


def _fields(
    cls: type[Any], value: object, key: str, problems: list[str], *, required: bool = False
) -> dict[str, Any]:
    """The keys of the mapping `value` that are valid fields of the attrs class `cls`, values
    converted (a path string to `Path`); every unknown, missing, mistyped or out-of-range key is
    added to `problems` under `key`."""
    if value is None and not required:
        problems.append(f"{key}: expected a mapping of keys, got null")
        return {}
    if not isinstance(value, dict):
        _mapping(value, key, problems, required=required)  # says what is there instead
        return {}
    given = value
    hints = typing.get_type_hints(cls)
    names = [field.name for field in attrs.fields(cls)]
    valid: dict[str, Any] = {}
    for name, item in given.items():
        dotted = f"{key}.{name}"
        if name not in names:
            problems.append(_unknown_key(key, name, names))
            continue
        problem = _type_problem(item, hints[name]) or _value_problem(cls, name, item)
        if problem is not None:
            problems.append(f"{dotted}: {problem}")
            continue
        valid[name] = Path(item) if hints[name] is Path else item
    for field in attrs.fields(cls):
        if field.default is attrs.NOTHING and field.name not in given:
            problems.append(f"{key}.{field.name}: required key is missing")
    return valid


def _type_problem(value: object, expected: Any) -> str | None:
    """What is wrong with the type of `value` for a field typed `expected`, or None."""
    origin = typing.get_origin(expected)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(expected)
        if value is None and type(None) in options:
            return None
        others = [option for option in options if option is not type(None)]
        if len(others) != 1:
            raise TypeError(f"no check for a field of type {expected}")
        return _type_problem(value, others[0])
    if origin is Literal:
        choices = typing.get_args(expected)
        if any(type(value) is type(c) and value == c for c in choices):
            return None
        return f"must be one of {', '.join(map(repr, choices))}, got {_shown(value)}"
    names: dict[Any, tuple[type | tuple[type, ...], str]] = {
        Path: (str, "a path (a string)"),
        str: (str, "a string"),
        int: (int, "an integer"),
        bool: (bool, "true or false"),
    }
    if expected not in names:
        raise TypeError(f"no check for a field of type {expected}")
    kind, wanted = names[expected]
    if isinstance(value, kind) and (expected is bool or not isinstance(value, bool)):
        return None
    return f"expected {wanted}, got {_shown(value)}"


def _non_empty(value: Any) -> str | None:
    return "must not be empty" if value == "" else None


def _sub_folder(value: Any) -> str | None:
    # Joined to the dataset root: an absolute path or `..` would leave it.
    parts = Path(value).parts
    if not value or Path(value).is_absolute() or ".." in parts:
        return f"must be a folder inside the dataset root, got {value!r}"
    return None


def _at_least(minimum: int) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        return f"must be at least {minimum}, got {value}" if value < minimum else None

    return check


_VALUE_CHECKS: dict[tuple[type, str], Callable[[Any], str | None]] = {
    (SourceConfig, "path"): _non_empty,
    (SourceConfig, "image_key"): _non_empty,
    (SourceConfig, "conditioning_key"): _non_empty,
    (SourceConfig, "caption_key"): _non_empty,
    (SourceConfig, "caption_suffix"): _non_empty,
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


def _check_buckets(buckets: Mapping[str, int], family: ModelFamily, problems: list[str]) -> None:
    """The `data.buckets` keys given must be valid (`BucketSettings`) and make a table with the
    family's defaults for the rest: the launch's preflight refuses what does not."""
    try:
        BucketSettings(**buckets)
        resolve_buckets(buckets, family)
    except (ValueError, RunConfigError) as exc:
        problems.append(f"data.buckets: {exc}")


def _path_value(value: object, key: str, base: Path, problems: list[str]) -> Path | None:
    if value is None:
        return None
    problem = _type_problem(value, Path) or _non_empty(value)
    if problem is not None:
        problems.append(f"{key}: {problem}")
        return None
    assert isinstance(value, str)
    return _absolute(Path(value), base)


def _absolute(path: Path, base: Path) -> Path:
    path = path.expanduser()
    return path if path.is_absolute() else base / path


def _unknown_key(section: str, key: object, valid: Sequence[str]) -> str:
    close = get_close_matches(str(key), valid, n=1)
    hint = f" (did you mean {close[0]}?)" if close else f" (valid keys: {', '.join(valid)})"
    return f"{section}.{key}: unknown key{hint}"


def _shown(value: object) -> str:
    if value is None:
        return "null"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# -- the model family ---------------------------------------------------------------------------


def _family(model: Mapping[Any, Any], base: Path, problems: list[str]) -> ModelFamily:
    """The family of the raw `model` section (its problems added to `problems`)."""
    named = model.get("family")
    if named is not None and named not in FAMILY_RESOLUTIONS:
        choices = ", ".join(FAMILY_RESOLUTIONS)
        problems.append(f"model.family: must be one of {choices} (or null), got {_shown(named)}")
        named = None
    source = model.get("source")
    if source is not None and (not isinstance(source, str) or not source):
        problems.append(
            f"model.source: expected a folder or hub id (a string), got {_shown(source)}"
        )
        source = None
    return model_family(source, named, base)


def model_family(source: str | None, named: str | None, base: Path) -> ModelFamily:
    """The family `named` (`model.family`), else the one the local model folder `source`
    shows (a relative folder is relative to `base`), else unknown, with the reason. Training
    finds its family for the bucket defaults with this too."""
    unet, why_not = _unet_config(source, base)
    if named is not None:
        return ModelFamily(named, _resolution(named, unet), f"model.family {named}")
    if unet is None:
        return ModelFamily(None, None, why_not)
    detected = detect_family(unet)
    where = f"{source}/unet/config.json"
    if detected is None:
        kind = unet.get("addition_embed_type")
        return ModelFamily(None, None, f"{where} has addition_embed_type {kind!r}")
    return ModelFamily(detected, _resolution(detected, unet), f"{where} shows {detected}")


def detect_family(unet: Mapping[str, Any]) -> str | None:
    """The family of a UNet config, by `cnet_models.families.detect_family`'s rule (a test keeps
    the two in step): SDXL has `addition_embed_type: text_time`; SD 2.x linear projections or a
    1024-wide cross-attention; SD 1.x neither. None for an addition embedding no family uses."""
    kind = unet.get("addition_embed_type")
    if kind == "text_time":
        return "sdxl"
    if kind not in (None, ""):
        return None
    if unet.get("use_linear_projection") or unet.get("cross_attention_dim") == 1024:
        return "sd21"
    return "sd15"


def _resolution(family: str, unet: Mapping[str, Any] | None) -> int:
    """The family's training resolution; SD 2.1's 512 variant has 64-latent samples, not 96."""
    if family == "sd21" and unet is not None and unet.get("sample_size") == 64:
        return 512
    return FAMILY_RESOLUTIONS[family]


def _unet_config(source: str | None, base: Path) -> tuple[dict[str, Any] | None, str]:
    """The UNet config of a local model folder, or None and why it is not available."""
    if source is None:
        return None, "the config has no model.source"
    folder = _local_folder(source, base)
    if folder is None:
        return None, (
            f"model.source {source!r} is a hub id (only a local folder's unet/config.json is "
            "read for the family)"
        )
    return _json_object(folder / "unet" / "config.json")


def _json_object(path: Path) -> tuple[dict[str, Any] | None, str]:
    """The JSON object in the small file `path`, or None and why not."""
    try:
        if path.stat().st_size > MAX_UNET_CONFIG_BYTES:
            return None, f"{path} is larger than 1 MiB"
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None, f"{path} does not exist"
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        return None, f"{path} cannot be read: {exc}"
    if not isinstance(data, dict):
        return None, f"{path} does not hold a JSON object"
    return data, ""


def _local_folder(source: str, base: Path) -> Path | None:
    """`source` as a folder, if it means one (the rule of `cnet_models.configs.looks_local`:
    it starts with `.`, `/` or `~`, is absolute, holds a backslash or a second `/`, or exists
    relative to the config's folder); None for a hub id."""
    path = _absolute(Path(source), base)
    if source.startswith((".", "/", "~")) or os.path.isabs(source) or "\\" in source:
        return path
    if source.count("/") > 1:
        return path
    try:
        return path if path.exists() else None
    except (OSError, ValueError):  # a name too long, or with a NUL byte, exists nowhere
        return None
