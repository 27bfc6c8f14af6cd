"""Full tensors of parameters that a strategy shards, for exports and full-state checkpoints.

Two kinds of sharded parameter reach cnet: FSDP2 (`fully_shard`) parameters are DTensors, and
DeepSpeed ZeRO-3 parameters are empty placeholders whose values live in per-rank flat partitions
(`ds_tensor`). Gathering either is a collective: every rank must call, in the same order. Plain
tensors (single device, DDP, ZeRO-2) come back as they are. DeepSpeed is imported only when a
ZeRO-3 parameter is met, so nothing here needs it installed.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

__all__ = [
    "full_state_dict",
    "full_tensor",
    "is_writer",
    "is_zero3_partitioned",
    "local_part",
]


def is_zero3_partitioned(t: torch.Tensor) -> bool:
    """Whether `t` is a DeepSpeed ZeRO-3 parameter (its values live in `t.ds_tensor`)."""
    return hasattr(t, "ds_id") and hasattr(t, "ds_tensor")


def is_writer() -> bool:
    """Rank 0 of the default group, or the only process."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole value of `t` on every rank (collective for sharded `t`)."""
    if isinstance(t, DTensor):
        return t.full_tensor()
    if is_zero3_partitioned(t):
        import deepspeed

        with deepspeed.zero.GatheredParameters([t], modifier_rank=None):
            return t.data.detach().clone()
    return t


def local_part(t: torch.Tensor) -> torch.Tensor:
    """The values of `t` this rank holds (its shard of a sharded `t`, all of a plain one);
    never a collective."""
    if isinstance(t, DTensor):
        return t.to_local()
    if is_zero3_partitioned(t):
        part: torch.Tensor = t.ds_tensor  # type: ignore[attr-defined]
        return part
    return t


@torch.no_grad()
def full_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """`module`'s state dict as full tensors on the CPU, on rank 0 (`{}` on the others).

    Collective when anything is sharded: call on every rank. Tensors are gathered one at a time,
    so the peak extra memory is one full parameter, not the model.
    """
    keep = is_writer()
    out: dict[str, torch.Tensor] = {}
    for name, value in module.state_dict(keep_vars=True).items():
        full = full_tensor(value)
        if keep:
            out[name] = full.detach().to("cpu", copy=True)
    return out
