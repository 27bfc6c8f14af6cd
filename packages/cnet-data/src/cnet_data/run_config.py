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

This module assembles the section; the work is in three modules, re-exported here:
`cnet_data.config_checks` (strict YAML, per-field checks), `cnet_data.model_family` (the
family and its resolution) and `cnet_data.bucket_resolution` (the bucket settings).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import attrs

from cnet_data.bucket_resolution import ResolvedBuckets, bucket_config, resolve_buckets, run_buckets
from cnet_data.buckets import FAMILY_RESOLUTIONS, BucketSettings
from cnet_data.config_checks import (
    CONFIG_HINT,
    RunConfigError,
    absolute,
    checked_fields,
    mapping_section,
    path_value,
    read_mapping,
    unknown_key,
)
from cnet_data.model_family import ModelFamily, detect_family, family_of_section, model_family
from cnet_data.scan import ScanConfig
from cnet_data.sources import SourceConfig

__all__ = [
    "CONFIG_HINT",
    "DATA_KEYS",
    "DEFAULT_SCAN",
    "FAMILY_RESOLUTIONS",
    "MOVED_DATA_KEYS",
    "ModelFamily",
    "ResolvedBuckets",
    "RunConfigError",
    "RunDataConfig",
    "bucket_config",
    "detect_family",
    "load_run_config",
    "model_family",
    "resolve_buckets",
    "run_buckets",
]

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
)
"""The keys of cnet-train's `DataConfig` (a test keeps them in step): any other key in `data`
is a mistake, most likely a misspelling."""
MOVED_DATA_KEYS = {
    "caption_dropout": "conditioning.caption_dropout",
    "caption_dropout_embedding": "conditioning.caption_dropout_embedding",
}
"""Keys `data` held in earlier configs, and where they went (cnet-train's `MOVED_KEYS`; a test
keeps them in step): refused with a message that says where."""
DEFAULT_SCAN = ScanConfig(on_bad="skip")
"""`data.scan` when the config leaves the section out: the launch indexes what it can."""


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
    raw = read_mapping(path)
    base = path.parent.absolute()
    problems: list[str] = []
    data = mapping_section(raw.get("data"), "data", problems, required=True)
    problems += [_data_key_problem(key) for key in data if key not in DATA_KEYS]
    source = checked_fields(
        SourceConfig, data.get("source"), "data.source", problems, required=True
    )
    scan = checked_fields(ScanConfig, data.get("scan", {}), "data.scan", problems)
    known = len(problems)
    buckets = checked_fields(BucketSettings, data.get("buckets", {}), "data.buckets", problems)
    buckets = {key: value for key, value in buckets.items() if value is not None}
    buckets_read = len(problems) == known
    index = path_value(data.get("index"), "data.index", base, problems)
    run_dir = path_value(raw.get("run_dir"), "run_dir", base, problems)
    model = mapping_section(raw.get("model"), "model", problems)
    family = family_of_section(model, base, problems)
    if buckets_read:  # each key is fine: do they make a table with the family's defaults?
        _check_buckets(buckets, family, problems)
    if problems:
        count = f"{len(problems)} problem{'s' if len(problems) != 1 else ''}"
        lines = "\n".join(f"  {p}" for p in problems)
        raise RunConfigError(f"invalid config {path} ({count}):\n{lines}", problems)
    source["path"] = absolute(source["path"], base)
    return RunDataConfig(
        file=path,
        source=SourceConfig(**source),
        scan=ScanConfig(**scan) if "scan" in data else DEFAULT_SCAN,
        buckets=buckets,
        index=index if index is not None else (run_dir / "index" if run_dir else None),
        family=family,
    )


def _data_key_problem(key: object) -> str:
    moved = MOVED_DATA_KEYS.get(str(key))
    if moved is not None:
        return f"data.{key} moved to {moved} (same meaning and values)"
    return unknown_key("data", key, DATA_KEYS)


def _check_buckets(buckets: Mapping[str, int], family: ModelFamily, problems: list[str]) -> None:
    """The `data.buckets` keys given must be valid (`BucketSettings`) and make a table with the
    family's defaults for the rest: the launch's preflight refuses what does not."""
    try:
        BucketSettings(**buckets)
        resolve_buckets(buckets, family)
    except (ValueError, RunConfigError) as exc:
        problems.append(f"data.buckets: {exc}")
