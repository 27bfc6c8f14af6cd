"""FLOPs of a training step's controlled UNet, counted once per input shape on meta copies.

A bucketed run has one batch shape per bucket, and the FLOPs of a step scale with its area, so
one number per run (what Lightning's `ThroughputMonitor` reads from `flops_per_batch`) would be
wrong for every bucket but one. `ForwardFlops` watches the forward calls of the ControlNet and
the frozen UNet in the training step (forward pre-hooks: they see the exact arguments, whatever
the family passes, and read only shapes, never values), and the first time a model sees a new
set of input shapes it counts, with Lightning's `measure_flops`, the forward and backward of a
copy of that model on the meta device (built from its config: no memory, no device time) with
meta inputs of those shapes. The backward is what training runs: weight gradients where the
real weights train (the ControlNet), input gradients where the real inputs carry them (the
UNet's residual inputs, on the way back to the ControlNet); gradient checkpointing's recompute
is not counted, as model FLOPs utilisation conventionally leaves it out.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from lightning.fabric.utilities.throughput import measure_flops
from torch.utils.hooks import RemovableHandle

from cnet_models.facade import ControlNetModel, UNet2DConditionModel

ShapeKey = tuple[str, tuple[tuple[int, ...], ...]]
"""(model name, the shapes of its tensor inputs): what one FLOP count holds for."""
Args = tuple[tuple[Any, ...], dict[str, Any]]


def meta_copy(model: torch.nn.Module) -> torch.nn.Module:
    """`model`'s architecture from its diffusers config, on the meta device in float32, with
    each parameter training where the real one does."""
    kind: Any = ControlNetModel if isinstance(model, ControlNetModel) else UNet2DConditionModel
    config: Any = model.config  # diffusers' FrozenDict of the constructor's arguments
    with torch.device("meta"):
        copy: torch.nn.Module = kind.from_config(dict(config))
    trains = {name: p.requires_grad for name, p in model.named_parameters()}
    for name, param in copy.named_parameters():
        param.requires_grad_(trains.get(name, False))
    return copy.float()


def as_meta(value: Any) -> Any:
    """`value` with every tensor in it (in tuples, lists and dicts too) replaced by an empty
    meta tensor of its shape that requires grad where it does; floats become float32, as the
    meta copies are. Reads no values: no device sync."""
    if isinstance(value, torch.Tensor):
        dtype = torch.float32 if value.is_floating_point() else value.dtype
        meta = torch.empty(value.shape, dtype=dtype, device="meta")
        return meta.requires_grad_(value.requires_grad and value.is_floating_point())
    if isinstance(value, tuple | list):
        return type(value)(as_meta(item) for item in value)
    if isinstance(value, dict):
        return {key: as_meta(item) for key, item in value.items()}
    return value


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, tuple | list):
        for item in value:
            yield from _tensors(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)


def shape_key(name: str, args: Args) -> ShapeKey:
    return name, tuple(tuple(t.shape) for t in _tensors(args))


def training_flops(model: torch.nn.Module, args: Args) -> int:
    """FLOPs of `model`'s forward on `args` (meta) and of the backward training needs."""
    positional, keywords = args

    def forward() -> Any:
        return model(*positional, **keywords)

    def loss(outputs: Any) -> torch.Tensor:
        grads = [t.sum() for t in _tensors(outputs) if t.requires_grad]
        return torch.stack(grads).sum()

    trains = any(p.requires_grad for p in model.parameters())
    needs_backward = trains or any(t.requires_grad for t in _tensors(args))
    return measure_flops(model, forward, loss if needs_backward else None)


class ForwardFlops:
    """FLOPs of the watched models' training forward and backward, per input shape: each new
    shape is noted by a hook during the step and counted at `take`, outside the step."""

    def __init__(self, models: dict[str, torch.nn.Module]) -> None:
        self.models = models
        self.counts: dict[ShapeKey, int] = {}
        """FLOPs per (model, input shapes) counted so far."""
        self._copies: dict[str, torch.nn.Module] = {}
        self._new: dict[ShapeKey, Args] = {}
        self._seen: list[ShapeKey] = []
        self._handles: list[RemovableHandle] = []

    def watch(self) -> None:
        """Note the training forwards (those with grad enabled) of every watched model."""
        for name, model in self.models.items():
            hook = self._hook(name)
            self._handles.append(model.register_forward_pre_hook(hook, with_kwargs=True))

    def unwatch(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _hook(self, name: str) -> Callable[[torch.nn.Module, Any, Any], None]:
        def note(_: torch.nn.Module, args: Any, kwargs: Any) -> None:
            if not torch.is_grad_enabled():  # validation and the control gain: not training
                return
            key = shape_key(name, (args, kwargs))
            self._seen.append(key)
            if key not in self.counts and key not in self._new:
                self._new[key] = as_meta((tuple(args), dict(kwargs)))

        return note

    def take(self) -> int:
        """The FLOPs of the forwards noted since the last call (counting new shapes now)."""
        for key, args in self._new.items():
            name = key[0]
            if name not in self._copies:
                self._copies[name] = meta_copy(self.models[name])
            self.counts[key] = training_flops(self._copies[name], args)
        self._new = {}
        total = sum(self.counts[key] for key in self._seen)
        self._seen = []
        return total
