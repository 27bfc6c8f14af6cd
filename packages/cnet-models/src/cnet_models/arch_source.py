"""The architectures of a run's networks, from their configs alone, built on the meta device.

A memory plan must not load a 7 GB checkpoint to learn what it would cost: the configs (a few
kilobytes) say every shape. They are read the way loading reads them (diffusers' and
transformers' `from_pretrained` config readers, on the model folder, the hub cache or the hub);
where none can be read (a hub id on an offline machine without it in the cache), the family's
shipped full-size configs (`cnet_models.fullsize`) stand in, and `origin` says so.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import attrs
import torch
from torch import nn

from cnet_models.configs import REFERENCE_MODELS, BaseModelConfig, ControlNetConfig
from cnet_models.controlled import make_controlnet, prepare_controlnet
from cnet_models.facade import (
    AutoencoderKL,
    CLIPTextConfig,
    ControlNetModel,
    ModelFolderError,
    TextEncoder,
    UNet2DConditionModel,
    checked,
)
from cnet_models.families import detect_family, family_by_name
from cnet_models.fullsize import load_arch_config, text_encoder_class


@attrs.frozen
class ArchConfigs:
    """The configs of every network of a run, as plain dicts."""

    family: str
    unet: dict[str, Any]
    vae: dict[str, Any]
    text_encoders: tuple[dict[str, Any], ...]
    """In the family's order."""
    controlnet: dict[str, Any] | None
    """A pretrained ControlNet's config; None: a new one from the UNet."""
    origin: str
    """Where the configs came from, for the report."""


@attrs.frozen
class MetaNetworks:
    """The run's networks on the meta device, in the dtypes and modes training uses."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoders: tuple[TextEncoder, ...]
    controlnet: ControlNetModel
    """float32, training, with gradient checkpointing as configured."""


def arch_configs(model: BaseModelConfig, controlnet: ControlNetConfig) -> ArchConfigs:
    """The configs of `model` (and of a pretrained ControlNet), read without any weights."""
    source = model.described_by
    reference = {hub_id: family for family, hub_id in REFERENCE_MODELS.items()}.get(source)
    cached = attrs.evolve(model, local_files_only=True)
    try:
        # The local folder or the hub cache first: offline, a hub lookup retries for a minute.
        unet = _diffusers_config(UNet2DConditionModel, source, "unet", cached)
    except (OSError, ValueError):
        if reference is not None or (model.local_files_only and model.family is not None):
            return _shipped(model.family or reference or "", controlnet, model)
        try:
            unet = _diffusers_config(UNet2DConditionModel, source, "unet", model)
        except (OSError, ValueError) as exc:
            if model.family is None:
                raise ModelFolderError(
                    f"cannot read the UNet config of {source} ({exc}); give model.family to "
                    "plan with the family's full-size configs"
                ) from exc
            return _shipped(model.family, controlnet, model)
    origin = f"the configs of {source}"
    family = model.family or detect_family(unet).name
    spec = family_by_name(family)
    vae = (
        _diffusers_config(AutoencoderKL, model.vae, None, model)
        if model.vae is not None
        else _diffusers_config(AutoencoderKL, source, "vae", model)
    )
    encoders = tuple(_text_config(source, sub, model) for sub in spec.text_encoders)
    return ArchConfigs(family, unet, vae, encoders, _controlnet_config(controlnet, model), origin)


def _shipped(family: str, controlnet: ControlNetConfig, model: BaseModelConfig) -> ArchConfigs:
    encoders = family_by_name(family).text_encoders
    return ArchConfigs(
        family,
        load_arch_config(family, "unet"),
        load_arch_config(family, "vae"),
        tuple(load_arch_config(family, part) for part in encoders),
        _controlnet_config(controlnet, model),
        f"cnet's full-size {family} configs ({model.described_by} is not on this machine)",
    )


def _diffusers_config(
    kind: Any, source: str, subfolder: str | None, model: BaseModelConfig
) -> dict[str, Any]:
    path = Path(source).expanduser()
    where = str(path) if path.exists() else source
    with warnings.catch_warnings():
        # diffusers' config reader passes huggingface_hub an argument it has deprecated.
        warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks")
        config = kind.load_config(
            where,
            subfolder=subfolder,
            revision=None if where != model.source else model.revision,
            local_files_only=model.local_files_only,
        )
    return dict(checked(config, dict, f"{subfolder or 'the'} config of {source}"))


def _text_config(source: str, subfolder: str, model: BaseModelConfig) -> dict[str, Any]:
    path = Path(source).expanduser()
    config = CLIPTextConfig.from_pretrained(
        str(path) if path.exists() else source,
        subfolder=subfolder,
        local_files_only=model.local_files_only,
    )
    return dict(config.to_dict())


def _controlnet_config(config: ControlNetConfig, model: BaseModelConfig) -> dict[str, Any] | None:
    if config.pretrained is None:
        return None
    return _diffusers_config(ControlNetModel, config.pretrained, None, model)


def meta_networks(
    arch: ArchConfigs, model: BaseModelConfig, controlnet: ControlNetConfig
) -> MetaNetworks:
    """Every network of the run on the meta device (no memory), as training sets them up."""
    dtype = model.torch_dtype
    with torch.device("meta"):
        unet = checked(
            UNet2DConditionModel.from_config(arch.unet), UNet2DConditionModel, "the UNet"
        )
        vae = checked(AutoencoderKL.from_config(arch.vae), AutoencoderKL, "the VAE")
        encoders = tuple(
            text_encoder_class(config)(CLIPTextConfig.from_dict(config))
            for config in arch.text_encoders
        )
        if arch.controlnet is not None:
            built = checked(
                ControlNetModel.from_config(arch.controlnet), ControlNetModel, "the ControlNet"
            )
            trainable = prepare_controlnet(built, unet, controlnet)
        else:
            trainable = make_controlnet(unet, controlnet)
    vae_dtype = torch.float32 if keeps_float32(arch.vae, model, dtype) else dtype
    parts: list[tuple[nn.Module, torch.dtype]] = [(unet, dtype), (vae, vae_dtype)]
    for part, part_dtype in [*parts, *((e, dtype) for e in encoders)]:
        part.to(part_dtype)
        part.requires_grad_(False)
        part.eval()
    return MetaNetworks(unet, vae, encoders, trainable)


def keeps_float32(vae_config: dict[str, Any], model: BaseModelConfig, dtype: torch.dtype) -> bool:
    """Whether the VAE stays float32 though the frozen dtype is float16: its config asks for it
    (`force_upcast`, SDXL's VAE overflows in float16) and no separate (fp16-safe) VAE is named."""
    upcast = bool(vae_config.get("force_upcast", False))
    return dtype == torch.float16 and model.vae is None and upcast
