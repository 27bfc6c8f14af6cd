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

Nothing here imports diffusers; the diffusers export lives in `ema_export`.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Literal

import attrs
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Placement, distribute_tensor

from cnet_models.gather import is_zero3_partitioned

__all__ = [
    "EMAConfig",
    "EMAStateError",
    "ExponentialMovingAverage",
    "ShadowDevice",
    "clean_name",
    "merge_partition_states",
]

ShadowDevice = Literal["same", "cpu"]
STATE_FORMAT = 1
PARTITION_KEY = "partition"
"""In a ZeRO-3 EMA state: which rank of how many wrote this part."""
# Wrappers that prefix parameter names without changing the model: torch.compile, activation
# checkpointing, FSDP1. Names are compared without them, so an EMA made from the bare model
# also fits the wrapped one.
_WRAPPER_PREFIXES = ("_orig_mod.", "_checkpoint_wrapped_module.", "_fsdp_wrapped_module.")


def clean_name(name: str) -> str:
    """`name` without the segments that compile / checkpoint wrappers insert."""
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def _in_unit_interval(_: object, attribute: attrs.Attribute[float], value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"ema.{attribute.name} must be in [0, 1], got {value}")


@attrs.frozen
class EMAConfig:
    """How the moving average decays and how often it is updated.

    The decay applied for optimiser step `s` (counted from 1 after the first optimiser step) is,
    with `t = s - update_after_step - 1`:

    - `0` when `t <= 0`: until the average starts, the shadow simply follows the weights;
    - otherwise `max(min_decay, min(decay, 1 - (1 + t / inv_gamma) ** -power))` with warm-up,
      or `max(min_decay, decay)` without.

    This is diffusers' `EMAModel.get_decay(s)` with `use_ema_warmup=True` when `step()` is called
    once per optimiser step; without warm-up the decay here is fixed, where diffusers would ramp
    it as `(1 + t) / (10 + t)`.
    """

    decay: float = attrs.field(default=0.9999, validator=_in_unit_interval)
    """Largest decay; the one used once warm-up is over (or always, without warm-up)."""
    warmup: bool = True
    """Ramp the decay up from 0 as `1 - (1 + t / inv_gamma) ** -power`, so that the average is
    not dominated for thousands of steps by the weights it started from."""
    inv_gamma: float = 1.0
    """Warm-up time scale in optimiser steps (the `inv_gamma` of diffusers and timm)."""
    power: float = 2 / 3
    """Warm-up exponent: 2/3 suits runs of up to about a million steps, 3/4 shorter ones."""
    update_after_step: int = attrs.field(default=0, validator=attrs.validators.ge(0))
    """Optimiser steps before the average starts; until then the shadow copies the weights."""
    min_decay: float = attrs.field(default=0.0, validator=_in_unit_interval)
    """Smallest decay once the average has started."""
    every_n_steps: int = attrs.field(default=1, validator=attrs.validators.ge(1))
    """Update every N optimiser steps. The skipped steps still count: an update applies the
    product of the per-step decays since the last update, so N only trades cost for staleness and
    the averaging horizon in optimiser steps does not change with it."""
    device: ShadowDevice = attrs.field(
        default="same", validator=attrs.validators.in_(("same", "cpu"))
    )
    """Where the shadow lives: next to the parameters, or in CPU memory (saves accelerator memory;
    each update then copies the weights to the host and waits for that copy)."""

    def __attrs_post_init__(self) -> None:
        if self.inv_gamma <= 0 or self.power <= 0:
            raise ValueError(
                f"ema.inv_gamma and ema.power must be > 0, got {self.inv_gamma}, {self.power}"
            )
        if self.min_decay > self.decay:
            raise ValueError(f"ema.min_decay {self.min_decay} exceeds ema.decay {self.decay}")

    def decay_at(self, step: int) -> float:
        """The decay for optimiser step `step` (the formula in the class docstring)."""
        t = step - self.update_after_step - 1
        if t <= 0:
            return 0.0
        ramp = 1.0 - (1.0 + t / self.inv_gamma) ** -self.power if self.warmup else self.decay
        return max(self.min_decay, min(self.decay, ramp))

    def decay_between(self, last_step: int, step: int) -> float:
        """The decay for the steps after `last_step` up to and including `step`: the product of
        their `decay_at`, which is what updating at every one of them would have applied to the
        old shadow. 1 when no step passed."""
        product = 1.0
        for s in range(last_step + 1, step + 1):
            product *= self.decay_at(s)
            if product == 0.0:  # a step before the start: the shadow restarts from the weights
                break
        return product


class EMAStateError(ValueError):
    """An EMA state (checkpoint) or module that does not fit this EMA; the message names why."""


@attrs.frozen
class _Layout:
    """How a sharded parameter's full tensor is spread over ranks (a DTensor's spec)."""

    mesh: DeviceMesh
    placements: tuple[Placement, ...]
    shape: torch.Size
    stride: tuple[int, ...]

    def to_global(self, local: torch.Tensor) -> DTensor:
        """The DTensor whose local shard is `local` (moved to the mesh's device if needed)."""
        return DTensor.from_local(
            local, self.mesh, self.placements, run_check=False, shape=self.shape, stride=self.stride
        )

    def local_part(self, value: torch.Tensor) -> torch.Tensor:
        """This rank's shard of `value`, a full tensor or a DTensor of the same global shape."""
        if isinstance(value, DTensor):
            if value.device_mesh == self.mesh and tuple(value.placements) == self.placements:
                return value.to_local()
            value = value.full_tensor()
        # src_data_rank=None: every rank holds the full tensor, so each slices locally, no traffic.
        on_mesh = value.to(self.mesh.device_type)
        return distribute_tensor(on_mesh, self.mesh, self.placements, src_data_rank=None).to_local()


@attrs.frozen
class _Zero3Layout:
    """How a DeepSpeed ZeRO-3 parameter is spread: rank r holds the r-th equal slice of the
    flattened tensor, the last one padded."""

    shape: torch.Size
    numel: int
    device: torch.device
    """Where the partitions live (the collective's device: a CPU shadow moves there for it)."""
    group: dist.ProcessGroup | None

    def to_full(self, local: torch.Tensor) -> torch.Tensor:
        """The full tensor from every rank's `local` partition (collective)."""
        on_device = local.to(self.device).contiguous()
        parts = [torch.empty_like(on_device) for _ in range(dist.get_world_size(self.group))]
        dist.all_gather(parts, on_device, group=self.group)
        return torch.cat(parts)[: self.numel].view(self.shape).to(local.device)

    def local_part(self, value: torch.Tensor) -> torch.Tensor:
        """This rank's partition of the full tensor `value`."""
        world, rank = dist.get_world_size(self.group), dist.get_rank(self.group)
        size = -(-self.numel // world)
        flat = (value.full_tensor() if isinstance(value, DTensor) else value).reshape(-1)
        part = flat[rank * size : (rank + 1) * size]
        return torch.cat([part, part.new_zeros(size - part.numel())])


def _local(t: torch.Tensor) -> torch.Tensor:
    if isinstance(t, DTensor):
        return t.to_local()
    if is_zero3_partitioned(t):
        partition: torch.Tensor = t.ds_tensor  # type: ignore[attr-defined]
        return partition
    return t


def _layout(t: torch.Tensor) -> _Layout | _Zero3Layout | None:
    if isinstance(t, DTensor):
        return _Layout(t.device_mesh, tuple(t.placements), t.shape, t.stride())
    if is_zero3_partitioned(t):
        shape = torch.Size(t.ds_shape)  # type: ignore[attr-defined]
        group = getattr(t, "ds_process_group", None)
        return _Zero3Layout(shape, shape.numel(), _local(t).device, group)
    return None


def _refuse_fsdp1(module: nn.Module) -> None:
    from torch.distributed.fsdp import FullyShardedDataParallel

    if any(isinstance(m, FullyShardedDataParallel) for m in module.modules()):
        raise EMAStateError(
            "EMA cannot average FSDP1 (FullyShardedDataParallel) parameters: they are flat "
            "rank-local slices without layout. Shard with torch.distributed.fsdp.fully_shard."
        )


def _to_host(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """`tensors` on the CPU. The copies are queued without blocking (into pinned memory) and then
    waited for once per device, rather than once per tensor."""
    out = [t.to("cpu", non_blocking=True) for t in tensors]
    for device in {t.device for t in tensors if t.device.type != "cpu"}:
        torch.accelerator.synchronize(device)
    return out


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
        self._layouts = {name: _layout(p) for name, p in trainable}
        self._shadow = [self._fresh_copy(_local(p)) for _, p in trainable]
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
            live = _to_host(live)
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
            if _local(params[name]).shape != shadow.shape:
                raise EMAStateError(
                    f"parameter {name!r} has local shape {tuple(_local(params[name]).shape)}, "
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
        return [_local(params[name]).detach() for name in self._names]

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
            elif isinstance(layout, _Zero3Layout):
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
        return any(isinstance(layout, _Zero3Layout) for layout in self._layouts.values())

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
        rank, world = _check_partition(partition)
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
        shadow, step = _checked_state(state)
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
            _own_part(name, shadow[name], current)
            if own_partitions
            else _local_of(name, shadow[name], self._layouts[name], current)
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


def _check_partition(partition: object) -> tuple[int, int]:
    if not isinstance(partition, Mapping) or not {"rank", "world"} <= set(partition):
        raise EMAStateError(f"EMA state {PARTITION_KEY} {partition!r} lacks 'rank' and 'world'")
    return int(partition["rank"]), int(partition["world"])


def merge_partition_states(
    states: Sequence[Mapping[str, object]], shapes: Mapping[str, torch.Size]
) -> dict[str, object]:
    """One full EMA state from the `partition_state_dict` of every rank (in any order), for
    parameters of the given full `shapes`; what `load_state_dict` of an unsharded EMA takes."""
    ranks = [_check_partition(s.get(PARTITION_KEY)) for s in states]
    by_rank = {rank: s for (rank, _), s in zip(ranks, states, strict=True)}
    worlds = {world for _, world in ranks}
    if len(worlds) != 1 or sorted(by_rank) != list(range(worlds.pop())):
        raise EMAStateError(f"EMA partitions of ranks {sorted(by_rank)} do not make a whole")
    parts = [_checked_state(by_rank[r])[0] for r in sorted(by_rank)]
    full = {}
    for name, shape in shapes.items():
        flat = torch.cat([part[name].reshape(-1) for part in parts])
        full[name] = flat[: shape.numel()].view(shape).clone()
    merged = {k: v for k, v in by_rank[0].items() if k != PARTITION_KEY}
    merged["shadow"] = full
    return merged


def _local_of(
    name: str, value: torch.Tensor, layout: _Layout | _Zero3Layout | None, current: torch.Tensor
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


def _own_part(name: str, value: torch.Tensor, current: torch.Tensor) -> torch.Tensor:
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


def _checked_state(state: Mapping[str, object]) -> tuple[dict[str, torch.Tensor], int]:
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
