"""Configuration of the base model and the ControlNet: attrs only, no diffusers import, so a
training config can be read and checked in milliseconds, before any model loads."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

import attrs
import torch

from cnet_models.families import FamilyName

DTypeName = Literal["float32", "bfloat16", "float16"]
FrozenDTypeName = Literal["auto", "float32", "bfloat16", "float16"]
"""A `DTypeName`, or `auto`: what the training run's precision settles it to."""
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


# A hub repository id: `name` or `org/name`, letters, digits, `_`, `.` and `-`.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(?:/[A-Za-z0-9][\w.-]*)?")


def looks_local(source: str, base: Path | None = None) -> bool:
    """Whether `source` means a folder on disk rather than a hub id.

    A hub id is `name` or `org/name`; so a source that starts with `.`, `/` or `~`, is an
    absolute path, holds a backslash or a second `/`, or exists (relative to `base`, or to the
    current directory) is a path. Such a source that does not exist must be reported as a
    missing folder: tried as a hub id it costs a minute of retries and then a message about
    `config.json` that names neither the key nor the folder.
    """
    if source.startswith((".", "/", "~")) or os.path.isabs(source) or "\\" in source:
        return True
    if source.count("/") > 1 or (os.altsep is not None and os.altsep in source):
        return True
    try:
        return ((base / source) if base is not None else Path(source)).exists()
    except (OSError, ValueError):  # a name too long, or with a NUL byte, exists nowhere
        return False


SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
REFERENCE_MODELS = {
    "sd15": "stable-diffusion-v1-5/stable-diffusion-v1-5",
    "sd21": "stabilityai/stable-diffusion-2-1",
    "sdxl": "stabilityai/stable-diffusion-xl-base-1.0",
}
"""The model whose configs describe a family's single-file checkpoints by default."""


def is_single_file(source: str) -> bool:
    """Whether `source` names one checkpoint file (by its suffix; it may not exist yet)."""
    return source.lower().endswith(SINGLE_FILE_SUFFIXES)


def is_hub_id(source: str) -> bool:
    """Whether `source` has the form of a hub repository id (`name` or `org/name`)."""
    return bool(_HUB_ID.fullmatch(source)) and "--" not in source and ".." not in source


def _non_empty(_: object, attribute: attrs.Attribute[Any], value: str | None) -> None:
    if value is not None and not value:
        raise ValueError("must not be empty (a folder or a hub id)")


def _channels(_: object, attribute: attrs.Attribute[Any], value: int) -> None:
    if value < 1:
        raise ValueError(f"must be at least 1, got {value}")


def _widths(_: object, attribute: attrs.Attribute[Any], value: tuple[int, ...] | None) -> None:
    if value is None:
        return
    if not value:
        raise ValueError("must list at least one width (or be null for the default)")
    for index, width in enumerate(value):
        if width < 1:
            raise ValueError(f"item {index} must be at least 1, got {width}")


@attrs.frozen
class BaseModelConfig:
    """Which base model to train a ControlNet for, and how to load it."""

    source: str = attrs.field(validator=_non_empty)
    """A local diffusers folder or a hub id (e.g. `stabilityai/stable-diffusion-xl-base-1.0`);
    see `looks_local` for which is which. Or a single-file checkpoint (`model.safetensors` in
    the original layout, as A1111, Forge and ComfyUI keep them), described by `config`."""
    family: FamilyName | None = None
    """`sd15`, `sd21` or `sdxl`; detected from the UNet config when not given."""
    vae: str | None = attrs.field(default=None, validator=_non_empty)
    """A separate VAE folder or hub id, e.g. an fp16-safe SDXL VAE."""
    frozen_dtype: FrozenDTypeName = "auto"
    """dtype of the frozen UNet, VAE and text encoders (the VAE of a family that needs it stays
    float32 under float16). `auto`: the dtype the run's `trainer.precision` computes in
    (bfloat16 under bf16-mixed, float16 under 16-mixed, float32 under 32), which a training
    command settles before loading; loaded outside one, float32."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) of `source`."""
    variant: str | None = None
    """Weight variant of `source`, e.g. `fp16`."""
    local_files_only: bool = False
    """Never reach the hub; a hub id must already be in the local cache."""
    config: str | None = attrs.field(default=None, validator=_non_empty)
    """A single-file `source` only: the diffusers folder or hub id whose component configs,
    tokenizers and scheduler describe it (None: the family's reference model on the hub,
    e.g. `stable-diffusion-v1-5/stable-diffusion-v1-5`; offline, it must be in the cache)."""

    @property
    def torch_dtype(self) -> torch.dtype:
        """The frozen parts' dtype (`auto` not settled by a training command: float32)."""
        return DTYPES.get(self.frozen_dtype, torch.float32)

    @property
    def single_file(self) -> bool:
        """Whether `source` is one checkpoint file rather than a folder or a hub id."""
        return is_single_file(self.source)

    @property
    def described_by(self) -> str:
        """Where the configs of the parts are: `source`, or for a single file its `config`
        (or the family's reference model)."""
        if not self.single_file or self.config is not None:
            return self.config or self.source
        family = self.family
        if family is None and Path(self.source).expanduser().is_file():
            from cnet_models.single_file import checkpoint_family

            family = checkpoint_family(Path(self.source).expanduser())
        return REFERENCE_MODELS.get(family or "", self.source)


@attrs.frozen
class ControlNetConfig:
    """Where the trainable ControlNet comes from and how it is run."""

    pretrained: str | None = attrs.field(default=None, validator=_non_empty)
    """An existing ControlNet (folder or hub id) to continue training; None: new from the UNet."""
    conditioning_channels: int = attrs.field(default=3, validator=_channels)
    """Channels of the control image (a new ControlNet only)."""
    conditioning_embedding_out_channels: tuple[int, ...] | None = attrs.field(
        default=None, validator=_widths
    )
    """Widths of the control-image encoder (a new ControlNet only; None: diffusers' default)."""
    conditioning_embedding_init: Literal["default", "he"] = "default"
    """How a new ControlNet's control-image encoder starts. `default`: PyTorch's default init,
    as diffusers and the original ControlNet leave it. It shrinks the signal at every layer, so
    at the start little of the control image reaches the encoder's output (measured on the
    demo's outlines: the output differs between control images about 400 times less than under
    `he`); the ControlNet must first learn to amplify it, one reason ControlNet training
    converges late and suddenly. `he`: He-normal weights and zero biases for every encoder
    convolution but the last, which keeps the control image's variation through the stack.
    The last convolution stays zero either way, so a new ControlNet still adds nothing at its
    first step. Ignored when `pretrained` is set (its weights are loaded as they are)."""
    gradient_checkpointing: bool = False
    """Recompute ControlNet activations in the backward pass (less memory, more compute)."""
    unet_gradient_checkpointing: bool | Literal["auto"] = "auto"
    """The same for the frozen UNet, through which the ControlNet's gradients flow (about a
    tenth more FLOPs per step; the UNet's saved activations are most of a step's memory).
    `auto`: cnet-train switches it on at launch on a GPU when its memory plan of the run does
    not fit the device without it, and says so in the log; elsewhere `auto` leaves it off."""
