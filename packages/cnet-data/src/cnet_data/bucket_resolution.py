"""The bucket table's settings of a run: the config's keys over the family's defaults.

`resolve_buckets` is what `cnet-data buckets --config RUN.yaml` and the launch
(`cnet_train.data.run_buckets`, through `run_buckets`) both call, so that the two show one
table: per field, the config's `data.buckets` (and flags), then the family's default
(`BucketConfig.for_resolution`), then `BucketConfig`'s own (SDXL's).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import attrs

from cnet_data.buckets import BucketConfig, BucketSettings
from cnet_data.config_checks import RunConfigError
from cnet_data.model_family import ModelFamily, model_family


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
