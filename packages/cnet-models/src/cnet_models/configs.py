"""Configuration of the base model and the ControlNet: attrs only, no diffusers import, so a
training config can be read and checked in milliseconds, before any model loads."""

from __future__ import annotations

from typing import Literal

import attrs
import torch

from cnet_models.families import FamilyName

DTypeName = Literal["float32", "bfloat16", "float16"]
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


@attrs.frozen
class BaseModelConfig:
    """Which base model to train a ControlNet for, and how to load it."""

    source: str
    """A local diffusers folder or a hub id (e.g. `stabilityai/stable-diffusion-xl-base-1.0`)."""
    family: FamilyName | None = None
    """`sd15`, `sd21` or `sdxl`; detected from the UNet config when not given."""
    vae: str | None = None
    """A separate VAE folder or hub id, e.g. an fp16-safe SDXL VAE."""
    frozen_dtype: DTypeName = "float32"
    """dtype of the frozen UNet, VAE and text encoders."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) of `source`."""
    variant: str | None = None
    """Weight variant of `source`, e.g. `fp16`."""
    local_files_only: bool = False
    """Never reach the hub; a hub id must already be in the local cache."""


@attrs.frozen
class ControlNetConfig:
    """Where the trainable ControlNet comes from and how it is run."""

    pretrained: str | None = None
    """An existing ControlNet (folder or hub id) to continue training; None: new from the UNet."""
    conditioning_channels: int = 3
    """Channels of the control image (a new ControlNet only)."""
    conditioning_embedding_out_channels: tuple[int, ...] | None = None
    """Widths of the control-image encoder (a new ControlNet only; None: diffusers' default)."""
    gradient_checkpointing: bool = False
    """Recompute ControlNet activations in the backward pass (less memory, more compute)."""
    unet_gradient_checkpointing: bool = False
    """The same for the frozen UNet, through which the ControlNet's gradients flow."""
