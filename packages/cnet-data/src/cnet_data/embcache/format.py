"""What a cache stores: field specs, storage dtypes, the record layout, keys and the errors."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import attrs
import numpy as np
import numpy.typing as npt
import torch

from cnet_data.captions import CAPTION_KEY_BYTES

CACHE_FORMAT = "cnet-embedding-cache"
CACHE_VERSION = 1
REBUILD_HINT = "rebuild the cache with `cnet-train embed`"

# numpy has no bfloat16, so every dtype travels through numpy as raw bytes and is given its
# meaning by torch's `Tensor.view(dtype)`.
STORAGE_DTYPES: Mapping[str, torch.dtype] = {
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float32": torch.float32,
}
_ALIGN = 8


class CacheError(Exception):
    """Anything wrong with an embedding cache."""


class CacheMismatchError(CacheError):
    """A cache written for another encoder (fingerprint) or with other fields."""


class CacheCorruptError(CacheError):
    """A cache file that is truncated, damaged or not what its name says."""


def _shape(value: Iterable[int]) -> tuple[int, ...]:
    return tuple(int(d) for d in value)


def _check_shape(_: object, __: object, shape: tuple[int, ...]) -> None:
    if any(d <= 0 for d in shape):
        raise ValueError(f"field shape {list(shape)} must have positive dimensions")


def _check_dtype(_: object, __: object, dtype: str) -> None:
    if dtype not in STORAGE_DTYPES:
        raise ValueError(f"storage dtype {dtype!r} is not one of {sorted(STORAGE_DTYPES)}")


@attrs.frozen
class FieldSpec:
    """One named tensor stored per key, e.g. SDXL's `prompt_embeds` of shape (77, 2048)."""

    name: str = attrs.field(validator=attrs.validators.min_len(1))
    """The key of this tensor in what `add` takes and `get` returns."""
    shape: tuple[int, ...] = attrs.field(converter=_shape, validator=_check_shape)
    """Shape of one entry, without the batch dimension."""
    dtype: str = attrs.field(validator=_check_dtype)
    """Storage dtype: "bfloat16", "float16" or "float32"; inputs are cast to it."""

    @property
    def torch_dtype(self) -> torch.dtype:
        return STORAGE_DTYPES[self.dtype]

    @property
    def nbytes(self) -> int:
        """Bytes of one entry's data, without padding."""
        return math.prod(self.shape) * self.torch_dtype.itemsize

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> FieldSpec:
        return cls(name=str(data["name"]), shape=tuple(data["shape"]), dtype=str(data["dtype"]))


@attrs.frozen
class RecordLayout:
    """Where each field sits inside a fixed-size record.

    Fields are stored back to back, each starting at a multiple of 8 bytes, so that a slice of a
    record can be viewed as any storage dtype without a misaligned access.
    """

    fields: tuple[FieldSpec, ...]
    """The fields, in storage order."""
    offsets: tuple[int, ...]
    """Byte offset of each field inside a record."""
    record_bytes: int
    """Size of one record, a multiple of 8."""

    @classmethod
    def of(cls, fields: Sequence[FieldSpec]) -> RecordLayout:
        names = [f.name for f in fields]
        if not names or len(set(names)) != len(names):
            raise ValueError(f"fields need unique names and at least one field, got {names}")
        offsets, pos = [], 0
        for field in fields:
            offsets.append(pos)
            pos += -(-field.nbytes // _ALIGN) * _ALIGN
        return cls(fields=tuple(fields), offsets=tuple(offsets), record_bytes=pos)

    def decode(self, records: npt.NDArray[np.uint8], *, copy: bool) -> dict[str, torch.Tensor]:
        """Tensors (batch first) out of an (n, record_bytes) array.

        `copy=True` for a memory map: tensors must own their memory, so that they stay valid and
        writable after the map is closed and can be collated or pinned. `copy=False` when
        `records` is already a private buffer.
        """
        out = {}
        for field, off in zip(self.fields, self.offsets, strict=True):
            raw = records[:, off : off + field.nbytes]
            raw = raw.copy() if copy else np.ascontiguousarray(raw)
            # Flattened first: torch only reinterprets bytes along a unit-stride last dimension.
            tensor = torch.from_numpy(raw.reshape(-1)).view(field.torch_dtype)
            out[field.name] = tensor.reshape(len(records), *field.shape)
        return out

    def encode(self, n: int, tensors: Mapping[str, torch.Tensor]) -> npt.NDArray[np.uint8]:
        """An (n, record_bytes) array from tensors of shape (n, *field.shape), cast for storage."""
        self.check(n, tensors)
        records = np.zeros((n, self.record_bytes), dtype=np.uint8)
        for field, off in zip(self.fields, self.offsets, strict=True):
            t = tensors[field.name].detach().to(device="cpu", dtype=field.torch_dtype)
            raw = t.contiguous().reshape(n, math.prod(field.shape)).view(torch.uint8).numpy()
            records[:, off : off + field.nbytes] = raw
        return records

    def check(self, n: int, tensors: Mapping[str, torch.Tensor]) -> None:
        """Raise ValueError naming the field unless `tensors` are exactly the fields, batch n."""
        names = {f.name for f in self.fields}
        if unknown := sorted(set(tensors) - names):
            raise ValueError(f"unknown fields {unknown}; this cache stores {sorted(names)}")
        for field in self.fields:
            if field.name not in tensors:
                raise ValueError(f"field {field.name!r} is missing from the tensors given")
            got, want = tuple(tensors[field.name].shape), (n, *field.shape)
            if got != want:
                raise ValueError(
                    f"field {field.name!r} has shape {list(got)}, expected {list(want)} "
                    f"({n} keys, entry shape {list(field.shape)})"
                )


def as_key(key: bytes | str) -> bytes:
    """A 16-byte caption key from its bytes or its 32 hex digits."""
    raw = bytes.fromhex(key) if isinstance(key, str) else bytes(key)
    if len(raw) != CAPTION_KEY_BYTES:
        raise ValueError(f"a cache key has {CAPTION_KEY_BYTES} bytes, got {len(raw)}: {key!r}")
    return raw


def keys_array(keys: Sequence[bytes | str]) -> npt.NDArray[np.uint8]:
    """Keys as an (n, 16) uint8 array, ready for the vectorised lookup."""
    joined = b"".join(as_key(k) for k in keys)
    return np.frombuffer(joined, dtype=np.uint8).reshape(len(keys), CAPTION_KEY_BYTES)
