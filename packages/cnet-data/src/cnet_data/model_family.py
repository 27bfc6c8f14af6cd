"""The base model's family, as far as the cnet-data commands can tell without cnet-models.

The family (which sets the bucket defaults) is `model.family`, else what the local model
folder's `unet/config.json` shows (read as plain JSON with the rule of
`cnet_models.families.detect_family`; a test keeps the two in step), else unknown, with the
reason said in the commands' output.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs

from cnet_data.buckets import FAMILY_RESOLUTIONS
from cnet_data.config_checks import absolute, shown

MAX_UNET_CONFIG_BYTES = 2**20
"""Largest `unet/config.json` read for the family (a real one is about two kilobytes)."""
FULL_SIZE_LATENT_SIDE = 64
"""The smallest `sample_size` (latent side) of a full-size UNet: at and above it the config
states the resolution the model was trained at (`sample_size` x 8 pixels); below it (tiny test
models) the family's default resolution applies."""
VAE_SCALE = 8
"""Pixels per latent: what every supported family's VAE downsamples by."""


@attrs.frozen
class ModelFamily:
    """What the config (or its local model folder) says about the base model's family."""

    name: str | None
    """`sd15`, `sd21` or `sdxl`; None when neither the config nor a model folder tells."""
    resolution: int | None
    """Side of the square resolution that family's base model was trained at; None if unknown."""
    reason: str
    """How the family was found, or why it was not: said in the command's output."""


def family_of_section(model: Mapping[Any, Any], base: Path, problems: list[str]) -> ModelFamily:
    """The family of the raw `model` section (its problems added to `problems`)."""
    named = model.get("family")
    if named is not None and named not in FAMILY_RESOLUTIONS:
        choices = ", ".join(FAMILY_RESOLUTIONS)
        problems.append(f"model.family: must be one of {choices} (or null), got {shown(named)}")
        named = None
    source = model.get("source")
    if source is not None and (not isinstance(source, str) or not source):
        problems.append(
            f"model.source: expected a folder or hub id (a string), got {shown(source)}"
        )
        source = None
    return model_family(source, named, base)


def model_family(source: str | None, named: str | None, base: Path) -> ModelFamily:
    """The family `named` (`model.family`), else the one the local model folder `source`
    shows (a relative folder is relative to `base`), else unknown, with the reason. Training
    finds its family for the bucket defaults with this too."""
    unet, why_not = _unet_config(source, base)
    if named is not None:
        return ModelFamily(named, _resolution(named, unet), f"model.family {named}")
    if unet is None:
        return ModelFamily(None, None, why_not)
    detected = detect_family(unet)
    where = f"{source}/unet/config.json"
    if detected is None:
        kind = unet.get("addition_embed_type")
        return ModelFamily(None, None, f"{where} has addition_embed_type {kind!r}")
    return ModelFamily(detected, _resolution(detected, unet), f"{where} shows {detected}")


def detect_family(unet: Mapping[str, Any]) -> str | None:
    """The family of a UNet config, by `cnet_models.families.detect_family`'s rule (a test keeps
    the two in step): SDXL has `addition_embed_type: text_time`; SD 2.x linear projections or a
    1024-wide cross-attention; SD 1.x neither. None for an addition embedding no family uses."""
    kind = unet.get("addition_embed_type")
    if kind == "text_time":
        return "sdxl"
    if kind not in (None, ""):
        return None
    if unet.get("use_linear_projection") or unet.get("cross_attention_dim") == 1024:
        return "sd21"
    return "sd15"


def _resolution(family: str, unet: Mapping[str, Any] | None) -> int:
    """The resolution the base model was trained at: what a full-size UNet config states by its
    latent side (SD 1.5 64 -> 512, SD 2.1 96 -> 768, SD 2.1-base 64 -> 512, SDXL 128 -> 1024),
    else (no config, or a tiny test model) the family's default."""
    side = unet.get("sample_size") if unet is not None else None
    if isinstance(side, int) and not isinstance(side, bool) and side >= FULL_SIZE_LATENT_SIDE:
        return side * VAE_SCALE
    return FAMILY_RESOLUTIONS[family]


def _unet_config(source: str | None, base: Path) -> tuple[dict[str, Any] | None, str]:
    """The UNet config of a local model folder, or None and why it is not available."""
    if source is None:
        return None, "the config has no model.source"
    folder = _local_folder(source, base)
    if folder is None:
        return None, (
            f"model.source {source!r} is a hub id (only a local folder's unet/config.json is "
            "read for the family)"
        )
    return _json_object(folder / "unet" / "config.json")


def _json_object(path: Path) -> tuple[dict[str, Any] | None, str]:
    """The JSON object in the small file `path`, or None and why not."""
    try:
        if path.stat().st_size > MAX_UNET_CONFIG_BYTES:
            return None, f"{path} is larger than 1 MiB"
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None, f"{path} does not exist"
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        return None, f"{path} cannot be read: {exc}"
    if not isinstance(data, dict):
        return None, f"{path} does not hold a JSON object"
    return data, ""


def _local_folder(source: str, base: Path) -> Path | None:
    """`source` as a folder, if it means one (the rule of `cnet_models.configs.looks_local`:
    it starts with `.`, `/` or `~`, is absolute, holds a backslash or a second `/`, or exists
    relative to the config's folder); None for a hub id."""
    path = absolute(Path(source), base)
    if source.startswith((".", "/", "~")) or os.path.isabs(source) or "\\" in source:
        return path
    if source.count("/") > 1:
        return path
    try:
        return path if path.exists() else None
    except (OSError, ValueError):  # a name too long, or with a NUL byte, exists nowhere
        return None
