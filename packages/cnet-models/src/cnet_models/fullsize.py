"""Real-size SD 1.5, SD 2.1 (768, v-prediction) and SDXL models with random weights, no download.

The architecture configs ship as JSON inside the package (`archs/<folder>/<part>.json`, the
folder a family's `arch_folder` names), written after the public model folders. Benchmarks and
the GPU smoke test build from them; on the meta device a 2.6-billion-parameter UNet costs no
memory, which is enough to count parameters and plan sharding.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from importlib import resources
from typing import Any

import attrs
import torch

from cnet_models.facade import (
    AutoencoderKL,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    ControlNetModel,
    TextEncoder,
    UNet2DConditionModel,
    checked,
)
from cnet_models.families import family_by_name

MODEL_PARTS = ("unet", "vae", "scheduler")
"""Parts every family has; the text encoders are named by the family."""

_TEXT_ENCODER_CLASSES: dict[str, type[TextEncoder]] = {
    "CLIPTextModel": CLIPTextModel,
    "CLIPTextModelWithProjection": CLIPTextModelWithProjection,
}


def arch_parts(family: str) -> tuple[str, ...]:
    """The parts with a shipped config for `family`, e.g. ("unet", "vae", "scheduler", ...)."""
    return (*MODEL_PARTS, *family_by_name(family).text_encoders)


def load_arch_config(family: str, part: str) -> dict[str, Any]:
    """The full-size config of one part of a family, as a fresh dict (safe to modify)."""
    if part not in arch_parts(family):
        raise ValueError(
            f"no {part!r} config for family {family!r}; expected one of "
            f"{', '.join(arch_parts(family))}"
        )
    folder = family_by_name(family).arch_folder
    text = resources.files("cnet_models").joinpath("archs", folder, f"{part}.json").read_text()
    config = json.loads(text)
    if not isinstance(config, dict):
        raise TypeError(f"archs/{folder}/{part}.json holds a {type(config).__name__}, not a dict")
    return config


def text_encoder_class(config: Mapping[str, Any]) -> type[TextEncoder]:
    """The class a text encoder config names in `architectures` (plain or with projection)."""
    name = config["architectures"][0]
    if name not in _TEXT_ENCODER_CLASSES:
        raise ValueError(f"unsupported text encoder architecture {name!r}")
    return _TEXT_ENCODER_CLASSES[name]


def build_text_encoder(family: str, part: str) -> TextEncoder:
    """`part` is a text encoder subfolder of the family ("text_encoder", "text_encoder_2")."""
    config = load_arch_config(family, part)
    return text_encoder_class(config)(CLIPTextConfig.from_dict(config))


@attrs.frozen
class FullSizeModels:
    """The trainable and frozen networks of one family, randomly initialised."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoders: tuple[TextEncoder, ...]
    """In the family's order ("text_encoder", then "text_encoder_2" for SDXL)."""
    controlnet: ControlNetModel | None


def build_fullsize(
    family: str,
    *,
    device: str | torch.device = "meta",
    dtype: torch.dtype | None = None,
    with_controlnet: bool = True,
) -> FullSizeModels:
    """All networks of `family` at real size, created directly on `device`.

    The default, the meta device, allocates nothing: shapes and parameter counts only. On a GPU
    the weights are initialised there, which is much faster than on the CPU. `dtype` converts
    after building (initialisation itself runs in float32, as diffusers and transformers do).
    """
    with torch.device(device):
        unet = UNet2DConditionModel.from_config(load_arch_config(family, "unet"))
        vae = AutoencoderKL.from_config(load_arch_config(family, "vae"))
        encoders = tuple(
            build_text_encoder(family, part) for part in family_by_name(family).text_encoders
        )
        # Inside the device context too: from_unet builds the ControlNet, then copies weights.
        controlnet = ControlNetModel.from_unet(unet) if with_controlnet else None
    if dtype is not None:
        for module in (unet, vae, *encoders, *([controlnet] if controlnet is not None else [])):
            module.to(dtype)
    return FullSizeModels(
        checked(unet, UNet2DConditionModel, f"{family} UNet"),
        checked(vae, AutoencoderKL, f"{family} VAE"),
        encoders,
        controlnet,
    )


def parameter_count(module: torch.nn.Module) -> int:
    """Number of parameters (works on the meta device)."""
    return sum(p.numel() for p in module.parameters())
