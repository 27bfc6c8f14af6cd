"""Counting the bytes a training step holds, by running it on the meta device.

Meta tensors have shapes, dtypes and storages but no data: a full-size SDXL step at 1024 runs
in seconds on a CPU and allocates nothing. `LiveBytes` sees every operator's outputs (a
dispatch mode, below autograd, so it also sees what autograd saves for the backward and what
the backward allocates) and follows each new storage until it is freed: the live total at the
end of the forward is what the step saves for its backward, and the running peak is the most it
held at once. This is the same counting as an allocator's, without the allocator's rounding.

Two things a GPU step does are not what the meta device does, and `AsOnGPU` (a function mode,
above autograd, where autocast and attention dispatch act) puts them right:

- autocast has no meta kernels, so its casting policy is applied here: matrix products and
  convolutions in the half dtype, with the half copies of trainable leaf weights cached for the
  forward as autocast caches them; normalisations and softmax in float32 (CUDA autocast's lists);
- attention: on the meta device `scaled_dot_product_attention` takes the composite path, which
  saves the whole attention matrix for the backward; a GPU (and the CPU) runs a flash kernel,
  which saves the output and one log-sum-exp per query. The flash operator is called instead
  (it has meta kernels for its forward and backward).

A gradient-checkpointed block recomputes its forward in the backward: run the backward under a
fresh `AsOnGPU` too, as checkpointing re-enters autocast for the recompute.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map
from typing_extensions import override


def _storage_ids(tree: Any) -> set[int]:
    return {id(t.untyped_storage()) for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)}


class LiveBytes(TorchDispatchMode):  # type: ignore[no-untyped-call]
    """The bytes of the storages operators create while the mode is active, while they live.

    A view or an in-place result shares an input's storage and is not new; every other output
    storage is counted from its creation until it is freed (PyTorch keeps one Python object per
    storage, so a weak reference to it sees the moment it goes)."""

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.now = 0
        """Bytes of the counted storages alive now."""
        self.peak = 0
        """The largest `now` since the mode started (or since `reset_peak`)."""
        self._alive: dict[int, weakref.ref[torch.UntypedStorage]] = {}

    def reset_peak(self) -> None:
        self.peak = self.now

    def _note(self, storage: torch.UntypedStorage) -> None:
        key = id(storage)
        if key in self._alive:
            return
        size = storage.nbytes()

        def freed(_: object, key: int = key, size: int = size) -> None:
            self._alive.pop(key, None)
            self.now -= size

        self._alive[key] = weakref.ref(storage, freed)
        self.now += size
        self.peak = max(self.peak, self.now)

    @override
    def __torch_dispatch__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        out = func(*args, **(kwargs or {}))
        inputs = _storage_ids((args, kwargs))
        for value in tree_flatten(out)[0]:
            if isinstance(value, torch.Tensor) and id(value.untyped_storage()) not in inputs:
                self._note(value.untyped_storage())
        return out


_HALF_FUNCTIONS: frozenset[Callable[..., Any]] = frozenset(
    {
        F.conv1d,
        F.conv2d,
        F.conv3d,
        F.conv_transpose2d,
        F.linear,
        F.scaled_dot_product_attention,
        torch.matmul,
        torch.Tensor.matmul,
        torch.Tensor.__matmul__,
        torch.mm,
        torch.bmm,
        torch.baddbmm,
        torch.addmm,
    }
)
"""What CUDA autocast runs in the half dtype (the ops diffusers' UNets and ControlNets call)."""
_FLOAT32_FUNCTIONS: frozenset[Callable[..., Any]] = frozenset(
    {
        F.group_norm,
        F.layer_norm,
        F.softmax,
        F.log_softmax,
        torch.softmax,
        torch.Tensor.softmax,
        F.mse_loss,
    }
)
"""What CUDA autocast runs in float32."""


class AsOnGPU(TorchFunctionMode):
    """Flash attention, and with a half `dtype` CUDA autocast's casts, on tensors of any device
    (the meta device included)."""

    def __init__(self, dtype: torch.dtype | None) -> None:
        super().__init__()
        self.dtype = dtype
        self._cache: dict[int, torch.Tensor] = {}
        """Half copies of trainable leaf tensors, kept for the forward like autocast's cache."""

    def _cast(self, value: Any, dtype: torch.dtype | None) -> Any:
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            return value
        if dtype is None or value.dtype == dtype:
            return value
        if dtype == self.dtype and value.is_leaf and value.requires_grad:
            key = id(value)
            if key not in self._cache:
                self._cache[key] = value.to(dtype)
            return self._cache[key]
        return value.to(dtype)

    @override
    def __torch_function__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        half = self.dtype is not None
        if half and func in _HALF_FUNCTIONS:
            args, kwargs = tree_map(lambda v: self._cast(v, self.dtype), (args, kwargs))
        elif half and func in _FLOAT32_FUNCTIONS:
            args, kwargs = tree_map(lambda v: self._cast(v, torch.float32), (args, kwargs))
        if func is F.scaled_dot_product_attention:
            return _flash_attention(*args, **kwargs)
        return func(*args, **kwargs)

    @override
    def __exit__(self, *exc: Any) -> None:
        self._cache.clear()  # as autocast frees its cache when the region ends
        super().__exit__(*exc)  # type: ignore[no-untyped-call]


def _flash_attention(  # noqa: PLR0917 (F.scaled_dot_product_attention's signature)
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    **others: Any,
) -> torch.Tensor:
    if attn_mask is not None or others:  # not a flash kernel's case on a GPU either
        return F.scaled_dot_product_attention(
            query, key, value, attn_mask, dropout_p, is_causal, scale=scale, **others
        )
    flash = torch.ops.aten._scaled_dot_product_flash_attention
    out: torch.Tensor = flash(query, key, value, dropout_p, is_causal, False, scale=scale)[0]
    return out
