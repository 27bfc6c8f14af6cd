"""What a checkpoint records of the run that wrote it, and the checks on resuming it.

Written by `ControlNetModule.on_save_checkpoint` and checked by its `on_load_checkpoint`,
which Lightning calls before any weight is loaded, on every rank with the same checkpoint (so
every rank stops with the same message):

- the resolved config and the world size, compared by the rules of `cnet_train.resume_rules`;
- the names of the module's weights, compared with the module's own: loading is strict for
  every strategy, ZeRO-1/2 included, whose module part is empty by design (the weights travel
  as the optimizer's float32 master, `strategies.ZeroCheckpointsWithoutDuplicateWeights`) and
  so cannot be checked by Lightning's strict loading.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

from cnet_train.config import TrainConfig
from cnet_train.config_io import config_to_dict
from cnet_train.errors import CnetError
from cnet_train.resume_rules import WORLD_SIZE_KEY, Change, compare

logger = logging.getLogger(__name__)

CONFIG_KEY = "cnet_config"
"""The resolved config of the run that wrote the checkpoint."""
WORLD_SIZE_RECORD_KEY = "cnet_world_size"
"""Its world size (ranks), which the config alone does not give (`devices: auto`)."""
WEIGHT_NAMES_KEY = "cnet_weight_names"
"""The names of the module's weights it saved (under every strategy)."""
START_FRESH = (
    "to start a fresh run instead, use another run_dir or set checkpoint.resume: none; to "
    "resume this run, set the keys back to the checkpoint's values"
)


class ResumeRefusedError(CnetError):
    """The checkpoint is another run's: its model, architecture or batch differs."""

    exit_code = 2


class WeightsMismatchError(CnetError):
    """The checkpoint's weights are not the module's: missing or unexpected names."""

    exit_code = 2


def record_run(
    checkpoint: dict[str, Any], config: TrainConfig, world_size: int, weight_names: Iterable[str]
) -> None:
    """Store in `checkpoint` what `check_resume` compares at the next launch."""
    checkpoint[CONFIG_KEY] = config_to_dict(config)
    checkpoint[WORLD_SIZE_RECORD_KEY] = world_size
    checkpoint[WEIGHT_NAMES_KEY] = sorted(weight_names)


def check_resume(
    checkpoint: Mapping[str, Any],
    config: TrainConfig,
    world_size: int,
    weight_names: Iterable[str],
    *,
    source: str,
    report: bool = True,
) -> list[Change]:
    """Refuse (`ResumeRefusedError`, `WeightsMismatchError`) a checkpoint `source` that does not
    fit this run; return the allowed changes, logged when `report` (on one rank)."""
    expected = set(weight_names)
    check_weight_names(checkpoint.get(WEIGHT_NAMES_KEY), expected, source)
    saved = checkpoint.get("state_dict")
    if isinstance(saved, Mapping) and saved:  # files carry the weights themselves
        check_weight_names(list(saved), expected, source)
    changes = config_changes(checkpoint, config, world_size)
    refused = [c for c in changes if c.refused]
    if refused:
        reasons = "; ".join(f"{c.line()} ({c.rule.why if c.rule else ''})" for c in refused)
        raise ResumeRefusedError(
            f"{source} was written by a run with other settings: {reasons}", hint=START_FRESH
        )
    if changes and report:
        logger.warning(
            "resuming %s with changed settings: %s", source, "; ".join(c.line() for c in changes)
        )
    return changes


def config_changes(
    checkpoint: Mapping[str, Any], config: TrainConfig, world_size: int
) -> list[Change]:
    """The changes from the run that wrote `checkpoint` to this one (none if it recorded no
    config: a checkpoint of another tool, which Lightning's own checks then judge)."""
    stored = checkpoint.get(CONFIG_KEY)
    if not isinstance(stored, Mapping):
        return []
    old: dict[str, Any] = dict(stored)
    new = config_to_dict(config)
    if isinstance(checkpoint.get(WORLD_SIZE_RECORD_KEY), int):
        old[WORLD_SIZE_KEY] = checkpoint[WORLD_SIZE_RECORD_KEY]
        new[WORLD_SIZE_KEY] = world_size
    return compare(old, new)


def check_weight_names(saved: object, expected: set[str], source: str) -> None:
    """Raise `WeightsMismatchError` naming the missing and unexpected weights unless the names
    `saved` are `expected`; nothing to check when `saved` is not a list (an older checkpoint)."""
    if not isinstance(saved, list):
        return
    names = {str(name) for name in saved}
    missing, unexpected = sorted(expected - names), sorted(names - expected)
    if not missing and not unexpected:
        return
    parts = [
        f"{label} {len(keys)} ({', '.join(keys[:5])}{', ...' if len(keys) > 5 else ''})"
        for label, keys in (("missing", missing), ("unexpected", unexpected))
        if keys
    ]
    raise WeightsMismatchError(
        f"{source} does not hold this ControlNet's weights: {'; '.join(parts)}",
        hint="resume with the controlnet settings the checkpoint was trained with, or "
        + START_FRESH,
    )
