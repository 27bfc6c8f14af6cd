"""`auto` precision and frozen dtype, settled for the machine a command runs on.

`trainer.precision: auto` becomes `bf16-mixed` on a CUDA GPU that computes in bfloat16
(Ampere and later), `16-mixed` on an older GPU (`32` there under DeepSpeed, which cnet runs
without its fp16 mode), and `32` on the CPU, where bf16-mixed measured 17-35% slower per step
than float32. `model.frozen_dtype: auto` then follows the settled precision: a mixed run keeps
the frozen UNet, VAE and text encoders in the half dtype its autocast computes in (half their
memory, and no cast at every layer); a float32 run keeps them in float32.

Every command that loads the base model settles the config first (training, `embed`, `encode`,
`evaluate`), so that a cache and the run that reads it agree on the machine they share.
`cnet-train plan` settles for this machine's GPU, or for a bfloat16 GPU where it has none.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import attrs
import torch
import yaml

from cnet_data.embcache import CacheMismatchError
from cnet_models.configs import DTypeName, FrozenDTypeName
from cnet_train.config import Precision, PrecisionSetting, TrainConfig, TrainerConfig
from cnet_train.config_io import CONFIG_FILE_NAME

logger = logging.getLogger(__name__)

GpuKind = Literal["bf16", "fp16"]
"""A CUDA GPU that computes in bfloat16, or one that has only float16 at full speed."""

FROZEN_DTYPES: dict[Precision, DTypeName] = {
    "32": "float32",
    "bf16-mixed": "bfloat16",
    "16-mixed": "float16",
}
"""The frozen parts' dtype under each precision (`model.frozen_dtype: auto`)."""

_DTYPE_NAMES: dict[torch.dtype, DTypeName] = {
    torch.float32: "float32",
    torch.bfloat16: "bfloat16",
    torch.float16: "float16",
}
_BY_NAME: dict[str, DTypeName] = {name: name for name in _DTYPE_NAMES.values()}
_PRECISIONS: dict[str, Precision] = {name: name for name in FROZEN_DTYPES}


def local_gpu(trainer: TrainerConfig) -> GpuKind | None:
    """The kind of GPU this machine trains `trainer` on; None where it trains on the CPU."""
    if trainer.accelerator == "cpu" or not torch.cuda.is_available():
        return None
    # Emulated bfloat16 (pre-Ampere GPUs run it through float32) is slower than float16.
    return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"


def auto_precision(trainer: TrainerConfig, gpu: GpuKind | None) -> Precision:
    """What `trainer.precision: auto` means on `gpu` (None: the CPU)."""
    if gpu == "bf16":
        return "bf16-mixed"
    if gpu == "fp16":
        # float16 needs loss scaling: DeepSpeed gives it only in its own fp16 mode (casting
        # the weights, which cnet keeps float32), Lightning's FSDP2 strategy not at all; the
        # TrainerConfig refuses both pairs.
        return "32" if trainer.strategy in ("deepspeed", "fsdp") else "16-mixed"
    return "32"


def settle_precision(
    config: TrainConfig, gpu: GpuKind | None, *, frozen: torch.dtype | None = None
) -> TrainConfig:
    """`config` with `auto` precision and frozen dtype replaced by what they mean on `gpu`;
    `frozen`: the dtype of a base model already in memory, which `auto` then names."""
    precision = config.trainer.precision
    settled = auto_precision(config.trainer, gpu) if precision == "auto" else precision
    dtype = config.model.frozen_dtype
    if dtype == "auto":
        dtype = (
            _DTYPE_NAMES.get(frozen, "float32") if frozen is not None else FROZEN_DTYPES[settled]
        )
    return _with_dtypes(config, settled, dtype)


def as_recorded(config: TrainConfig, checkpoint: Path | None) -> TrainConfig:
    """`config` with each `auto` setting as the run that wrote `checkpoint` settled it (its
    resolved `config.yaml`, beside `checkpoints/`): a resumed run keeps the dtypes it trained
    in, on whatever machine it continues, and so does a run from before `auto` existed."""
    recorded = _recorded_settings(checkpoint) if checkpoint is not None else {}
    precision = config.trainer.precision
    frozen = config.model.frozen_dtype
    if precision == "auto":
        precision = _PRECISIONS.get(recorded.get("precision", ""), precision)
    if frozen == "auto":
        frozen = _BY_NAME.get(recorded.get("frozen_dtype", ""), frozen)
    recorded_config = _with_dtypes(config, precision, frozen)
    if recorded_config is not config:
        logger.info("resuming with the recorded precision %s, frozen dtype %s", precision, frozen)
    return recorded_config


def _with_dtypes(
    config: TrainConfig, precision: PrecisionSetting, frozen: FrozenDTypeName
) -> TrainConfig:
    """`config` with this precision and frozen dtype (itself where both are already so)."""
    if (precision, frozen) == (config.trainer.precision, config.model.frozen_dtype):
        return config
    return attrs.evolve(
        config,
        trainer=attrs.evolve(config.trainer, precision=precision),
        model=attrs.evolve(config.model, frozen_dtype=frozen),
    )


def _recorded_settings(checkpoint: Path) -> dict[str, str]:
    """The precision and frozen dtype in the resolved config of `checkpoint`'s run, as far as
    it can be read (a missing or unreadable file records nothing)."""
    path = checkpoint.parent.parent / CONFIG_FILE_NAME
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
        return {
            "precision": str(data["trainer"]["precision"]),
            "frozen_dtype": str(data["model"]["frozen_dtype"]),
        }
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        return {}


def settle_here(config: TrainConfig, *, frozen: torch.dtype | None = None) -> TrainConfig:
    """`config` settled for this machine, with what `auto` became logged."""
    settled = settle_precision(config, local_gpu(config.trainer), frozen=frozen)
    for line in settled_lines(config, settled):
        logger.info("%s", line)
    return settled


def settled_lines(config: TrainConfig, settled: TrainConfig) -> list[str]:
    """`key: auto -> value` for each setting `settle_precision` replaced."""
    pairs = (
        ("trainer.precision", config.trainer.precision, settled.trainer.precision),
        ("model.frozen_dtype", config.model.frozen_dtype, settled.model.frozen_dtype),
    )
    return [f"{key}: auto -> {new}" for key, old, new in pairs if old != new]


@contextmanager
def dtype_hint() -> Iterator[None]:
    """A cache refused for its dtype also says where the dtype comes from: a cache built with
    another `model.frozen_dtype` (or where `auto` settled otherwise, e.g. on the CPU for a GPU
    run) is read by setting the dtype it was built with."""
    from cnet_train.latent_cache import LatentCacheError

    try:
        yield
    except (CacheMismatchError, LatentCacheError) as error:
        if "dtype" not in str(error):
            raise
        raise type(error)(
            f"{error}. The dtype is model.frozen_dtype's (auto: the one trainer.precision "
            "computes in, settled per machine): set model.frozen_dtype to the cache's dtype "
            "to read it as it is"
        ) from None
