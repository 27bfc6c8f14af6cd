"""Exponential moving average (EMA) of a module's trainable weights.

The shadow is a float32 copy of every parameter that requires grad, keyed by name, whatever the
live parameters' dtype. Sharded parameters (FSDP2 `fully_shard`, any DTensor) are averaged shard by
shard: each rank keeps the float32 copy of its own local shard and remembers how the full tensor
is laid out, so `state_dict` can hand out DTensors and `full_state_dict` / the export can gather
full tensors. DeepSpeed ZeRO-3 parameters are averaged the same way over their flat per-rank
partitions (`ds_tensor`), which are float32 when DeepSpeed trains in float32 under autocast, as cnet
runs it. DeepSpeed ZeRO-2 shards only the optimizer state; parameters are whole on every rank
and need nothing special. FSDP1 (`FullyShardedDataParallel`) flattens parameters into rank-local
slices that carry no layout, so it is refused rather than averaged wrongly.

Why cnet keeps its own EMA rather than a library's (checked against torch 2.13 and diffusers
0.42):

- `torch.optim.swa_utils.AveragedModel` deep-copies the whole module (the frozen base included
  when it is part of it) in the live dtype, so bfloat16 weights get a bfloat16 average; it pairs
  parameters by position, not name; and its EMA decay (`get_ema_multi_avg_fn`) is fixed, with
  no warm-up, start step or update every N steps.
- diffusers' `EMAModel` has the same decay rule (its warm-up is `EMAConfig`'s formula), but its
  shadow is `param.clone()` (the live dtype), a CPU shadow fails in `step` (it subtracts the
  device parameter from the host shadow), every `step` call counts as one optimizer step (no
  update every N), parameters pair by position, and under ZeRO-3 it gathers every full parameter
  on every rank for each update, and only when transformers' global DeepSpeed config says ZeRO-3
  (which Lightning's strategy does not set).
- Neither keeps a float32 shadow of just the local shard of a DTensor or of a ZeRO-3 partition
  (so the average costs one shard per rank, not one model), nor merges the ranks' ZeRO-3
  partitions at export; ZeRO-2 needs nothing of an EMA, its parameters being whole.

The parts: `ema_config` (the decay rule), `ema_layout` (sharded layouts), `ema_state` (the
checkpoint format and ZeRO-3 merge), this module (the average itself); `ema_export` writes the
averaged ControlNet as a diffusers folder.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import attrs
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from cnet_models.ema_config import EMAConfig, ShadowDevice
from cnet_models.ema_layout import Zero3Layout, layout_of, to_host
from cnet_models.ema_state import (
    PARTITION_KEY,
    STATE_FORMAT,
    EMAStateError,
    check_partition,
    checked_state,
    local_of,
    merge_partition_states,
    own_part,
)
from cnet_models.gather import local_part

__all__ = [
    "PARTITION_KEY",
    "STATE_FORMAT",
    "EMAConfig",
    "EMAStateError",
    "ExponentialMovingAverage",
    "ShadowDevice",
    "clean_name",
    "merge_partition_states",
]

# Wrappers that prefix parameter names without changing the model: torch.compile, activation
# checkpointing, FSDP1. Names are compared without them, so an EMA made from the bare model
# also fits the wrapped one.
_WRAPPER_PREFIXES = ("_orig_mod.", "_checkpoint_wrapped_module.", "_fsdp_wrapped_module.")


def clean_name(name: str) -> str:
    """`name` without the segments that compile / checkpoint wrappers insert."""
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def _refuse_fsdp1(module: nn.Module) -> None:
    from torch.distributed.fsdp import FullyShardedDataParallel

    if any(isinstance(m, FullyShardedDataParallel) for m in module.modules()):
        raise EMAStateError(
            "EMA cannot average FSDP1 (FullyShardedDataParallel) parameters: they are flat "
            "rank-local slices without layout. Shard with torch.distributed.fsdp.fully_shard."
        )


class ExponentialMovingAverage:
    """A float32 shadow of a module's trainable parameters and its update rule.

    Made from the module whose weights it averages; `update`, `copy_to`, `store` and the rest take
    the module again (the EMA holds no reference to it), find its parameters by name and check
    they still fit. Under sharding every method that moves full tensors is collective: call it on
    every rank.
    """

    def __init__(self, module: nn.Module, config: EMAConfig | None = None, step: int = 0) -> None:
        """Start from `module`'s current weights, taken as those after optimiser step `step`."""
        _refuse_fsdp1(module)
        self.config = config or EMAConfig()
        trainable = [(clean_name(n), p) for n, p in module.named_parameters() if p.requires_grad]
        if not trainable:
            raise EMAStateError("EMA of a module without trainable parameters")
        self._names = [name for name, _ in trainable]
        self._layouts = {name: layout_of(p) for name, p in trainable}
        self._shadow = [self._fresh_copy(local_part(p)) for _, p in trainable]
        self._step = step
        self._stored: list[torch.Tensor] | None = None
        self.last_decay = 0.0  # the decay the last update applied, for logging

    def _fresh_copy(self, t: torch.Tensor) -> torch.Tensor:
        device = torch.device("cpu") if self.config.device == "cpu" else t.device
        return t.detach().to(device, torch.float32, copy=True).contiguous()

    @property
    def step(self) -> int:
        """The optimiser step whose weights the shadow last took in."""
        return self._step

    @property
    def names(self) -> tuple[str, ...]:
        """Names of the averaged parameters, in the module's order."""
        return tuple(self._names)

    def shadow(self) -> dict[str, torch.Tensor]:
        """The float32 shadow by name: this rank's shard for sharded parameters. Not copies."""
        return dict(zip(self._names, self._shadow, strict=True))

    def is_sharded(self) -> bool:
        """Whether any averaged parameter is a DTensor (so gathers are collective)."""
        return any(layout is not None for layout in self._layouts.values())

    # -- the average --------------------------------------------------------------------------

    @torch.no_grad()
    def update(self, module: nn.Module, step: int) -> bool:
        """Take in `module`'s weights after optimiser step `step`; True if the shadow changed.

        Steps that are not a multiple of `every_n_steps` are skipped; a step already taken in
        is ignored (several calls per optimiser step, as with gradient accumulation, are safe).
        """
        if step < self._step:
            raise EMAStateError(f"EMA update for step {step}, but it is at step {self._step}")
        if step == self._step or step % self.config.every_n_steps != 0:
            return False
        decay = self.config.decay_between(self._step, step)
        live = self._live(module, check_untracked=True)
        if self.config.device == "cpu":
            live = to_host(live)
        # lerp needs matching dtypes; `.float()` is free for float32 weights.
        live32 = [t.float() for t in live]
        if decay == 0.0:
            torch._foreach_copy_(self._shadow, live32)
        else:
            torch._foreach_lerp_(self._shadow, live32, 1.0 - decay)
        self._step, self.last_decay = step, decay
        return True

    def _live(self, module: nn.Module, check_untracked: bool = False) -> list[torch.Tensor]:
        """The module's local parameter tensors in shadow order, checked against the shadow."""
        params = {clean_name(n): p for n, p in module.named_parameters()}
        for name, shadow in zip(self._names, self._shadow, strict=True):
            if name not in params:
                raise EMAStateError(f"module has no parameter {name!r}, which the EMA averages")
            if local_part(params[name]).shape != shadow.shape:
                raise EMAStateError(
                    f"parameter {name!r} has local shape {tuple(local_part(params[name]).shape)}, "
                    f"the EMA holds {tuple(shadow.shape)} (sharded differently?)"
                )
        if check_untracked:
            tracked = set(self._names)
            new = [n for n, p in params.items() if p.requires_grad and n not in tracked]
            if new:
                raise EMAStateError(
                    f"parameter {new[0]!r} is trainable but not averaged ({len(new)} such): "
                    "make the EMA after choosing what trains"
                )
        return [local_part(params[name]).detach() for name in self._names]

    @torch.no_grad()
    def copy_to(self, module: nn.Module) -> None:
        """Write the shadow into `module`'s parameters (cast to their dtype and device)."""
        torch._foreach_copy_(self._live(module), self._shadow)

    @torch.no_grad()
    def store(self, module: nn.Module) -> None:
        """Keep a copy of `module`'s current trainable weights, for `restore`."""
        if self._stored is not None:
            raise EMAStateError("EMA store() called twice without restore()")
        self._stored = [t.clone() for t in self._live(module)]

    @torch.no_grad()
    def restore(self, module: nn.Module) -> None:
        """Put back the weights `store` kept, and drop the copy."""
        if self._stored is None:
            raise EMAStateError("EMA restore() without store()")
        torch._foreach_copy_(self._live(module), self._stored)
        self._stored = None

    @contextmanager
    def averaged(self, module: nn.Module) -> Iterator[None]:
        """`module` holds the EMA weights inside the block, its own again after (also on error)."""
        self.store(module)
        try:
            self.copy_to(module)
            yield
        finally:
            self.restore(module)

    # -- checkpoints --------------------------------------------------------------------------

    def global_shadow(self) -> dict[str, torch.Tensor]:
        """The shadow by name with FSDP2-sharded entries as DTensors (full shape, nothing
        gathered) and ZeRO-3 entries gathered into full tensors (collective: a flat partition
        has no tensor type that carries its layout).

        A CPU shadow's shards move to the mesh's device for this (a DTensor lives on its mesh).
        """
        out: dict[str, torch.Tensor] = {}
        for name, t in zip(self._names, self._shadow, strict=True):
            layout = self._layouts[name]
            if layout is None:
                out[name] = t
            elif isinstance(layout, Zero3Layout):
                out[name] = layout.to_full(t)
            else:
                out[name] = layout.to_global(t)
        return out

    def state_dict(self) -> dict[str, object]:
        """What resume needs. Sharded entries are DTensors, which torch.distributed.checkpoint
        saves shard by shard and can reshard on load; use `full_state_dict` for a checkpoint that
        only rank 0 writes."""
        return self._state(self.global_shadow())

    def full_state_dict(self) -> dict[str, object]:
        """`state_dict` with full tensors on the CPU (collective when sharded; every rank gets
        them)."""
        full = {
            name: (t.full_tensor() if isinstance(t, DTensor) else t).to("cpu", copy=True)
            for name, t in self.global_shadow().items()
        }
        return self._state(full)

    def is_partitioned(self) -> bool:
        """Whether any averaged parameter is a DeepSpeed ZeRO-3 partition."""
        return any(isinstance(layout, Zero3Layout) for layout in self._layouts.values())

    def partition_state_dict(self) -> dict[str, object]:
        """This rank's own part of the state, for ZeRO-3 checkpoints, where every rank writes
        its own file: the flat shadow partitions, and which of how many ranks holds them
        (`merge_partition_states` puts the ranks' parts back together). A full state on every
        rank would store the whole EMA once per rank."""
        state = self._state({n: t.to("cpu", copy=True) for n, t in self.shadow().items()})
        state[PARTITION_KEY] = {"rank": dist.get_rank(), "world": dist.get_world_size()}
        return state

    def _state(self, shadow: dict[str, torch.Tensor]) -> dict[str, object]:
        # The config is recorded for inspection; loading keeps the current one (see load).
        return {
            "format": STATE_FORMAT,
            "step": self._step,
            "config": attrs.asdict(self.config),
            "shadow": shadow,
        }

    def _check_own_partition(self, partition: object) -> None:
        """A state `partition_state_dict` wrote must come from this rank of this world."""
        rank, world = check_partition(partition)
        if not self.is_partitioned() or (rank, world) != (dist.get_rank(), dist.get_world_size()):
            raise EMAStateError(
                f"EMA state holds the ZeRO-3 partitions of rank {rank} of {world}; resume it with "
                "the same number of ranks, or export it (cnet-train export merges the ranks)"
            )

    @torch.no_grad()
    def load_state_dict(self, state: Mapping[str, object]) -> None:
        """Resume from `state_dict` / `full_state_dict` output (sharded or full tensors, also of
        another sharding). Everything is checked before anything is overwritten.

        The current config stays in force: a resumed run may change the decay on purpose, so a
        different recorded config is only warned about.
        """
        shadow, step = checked_state(state)
        own_partitions = PARTITION_KEY in state
        if own_partitions:
            self._check_own_partition(state[PARTITION_KEY])
        mine = set(self._names)
        missing, unexpected = sorted(mine - set(shadow)), sorted(set(shadow) - mine)
        if missing or unexpected:
            raise EMAStateError(
                f"EMA state does not fit the model: missing {missing[:5]}, "
                f"unexpected {unexpected[:5]}"
            )
        locals_ = [
            own_part(name, shadow[name], current)
            if own_partitions
            else local_of(name, shadow[name], self._layouts[name], current)
            for name, current in zip(self._names, self._shadow, strict=True)
        ]
        for target, value in zip(self._shadow, locals_, strict=True):
            target.copy_(value)
        self._step = step
        if state.get("config") != attrs.asdict(self.config):
            warnings.warn(
                f"EMA state was saved with config {state.get('config')}, continuing with "
                f"{attrs.asdict(self.config)}",
                stacklevel=2,
            )
