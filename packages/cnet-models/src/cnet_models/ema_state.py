"""The EMA's checkpoint format: what a state dict holds, its checks, and the merge of ZeRO-3
per-rank partition states into one full state."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch.distributed.tensor import DTensor

from cnet_models.ema_layout import ShardLayout, Zero3Layout

__all__ = [
    "PARTITION_KEY",
    "STATE_FORMAT",
    "EMAStateError",
    "check_partition",
    "checked_state",
    "local_of",
    "merge_partition_states",
    "own_part",
]

STATE_FORMAT = 1
PARTITION_KEY = "partition"
"""In a ZeRO-3 EMA state: which rank of how many wrote this part."""


class EMAStateError(ValueError):
    """An EMA state (checkpoint) or module that does not fit this EMA; the message names why."""


def check_partition(partition: object) -> tuple[int, int]:
    if not isinstance(partition, Mapping) or not {"rank", "world"} <= set(partition):
        raise EMAStateError(f"EMA state {PARTITION_KEY} {partition!r} lacks 'rank' and 'world'")
    return int(partition["rank"]), int(partition["world"])


def merge_partition_states(
    states: Sequence[Mapping[str, object]], shapes: Mapping[str, torch.Size]
) -> dict[str, object]:
    """One full EMA state from the `partition_state_dict` of every rank (in any order), for
    parameters of the given full `shapes`; what `load_state_dict` of an unsharded EMA takes."""
    ranks = [check_partition(s.get(PARTITION_KEY)) for s in states]
    by_rank = {rank: s for (rank, _), s in zip(ranks, states, strict=True)}
    worlds = {world for _, world in ranks}
    if len(worlds) != 1 or sorted(by_rank) != list(range(worlds.pop())):
        raise EMAStateError(f"EMA partitions of ranks {sorted(by_rank)} do not make a whole")
    parts = [checked_state(by_rank[r])[0] for r in sorted(by_rank)]
    full = {}
    for name, shape in shapes.items():
        flat = torch.cat([part[name].reshape(-1) for part in parts])
        full[name] = flat[: shape.numel()].view(shape).clone()
    merged = {k: v for k, v in by_rank[0].items() if k != PARTITION_KEY}
    merged["shadow"] = full
    return merged


def local_of(
    name: str, value: torch.Tensor, layout: ShardLayout | Zero3Layout | None, current: torch.Tensor
) -> torch.Tensor:
    """This rank's part of the saved `value` for parameter `name`, checked against the model."""
    expected = layout.shape if layout is not None else current.shape
    if value.shape != expected:
        raise EMAStateError(
            f"EMA state for parameter {name!r} has shape {tuple(value.shape)}, "
            f"the model's is {tuple(expected)}"
        )
    if layout is not None:
        local = layout.local_part(value)
    else:
        local = value.full_tensor() if isinstance(value, DTensor) else value
    return _finite(name, local)


def own_part(name: str, value: torch.Tensor, current: torch.Tensor) -> torch.Tensor:
    """The saved local part of parameter `name` from this rank's own partition state."""
    if value.shape != current.shape:
        raise EMAStateError(
            f"EMA state partition for parameter {name!r} has shape {tuple(value.shape)}, "
            f"this rank's is {tuple(current.shape)}"
        )
    return _finite(name, value)


def _finite(name: str, local: torch.Tensor) -> torch.Tensor:
    if not bool(torch.isfinite(local).all()):
        raise EMAStateError(f"EMA state for parameter {name!r} holds inf or NaN")
    return local


def checked_state(state: Mapping[str, object]) -> tuple[dict[str, torch.Tensor], int]:
    """The shadow and step of an EMA state dict, or an `EMAStateError` saying what is wrong."""
    if state.get("format") != STATE_FORMAT:
        raise EMAStateError(f"EMA state format {state.get('format')!r}, expected {STATE_FORMAT}")
    shadow, step = state.get("shadow"), state.get("step")
    if not isinstance(step, int) or not isinstance(shadow, Mapping):
        raise EMAStateError("EMA state lacks an integer 'step' or a 'shadow' mapping")
    out: dict[str, torch.Tensor] = {}
    for name, value in shadow.items():
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            raise EMAStateError(f"EMA state for parameter {name!r} is not a float tensor")
        out[str(name)] = value
    return out, step
