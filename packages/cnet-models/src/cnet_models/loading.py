"""Loading a base model (a local diffusers folder or a hub id) for ControlNet training.

The same `from_pretrained` path a hub model takes; tests point it at a tiny local folder. Frozen
parts come back in eval mode, without gradients, in the requested dtype, with one exception
that diffusers' own pipelines make too: a VAE whose config says `force_upcast` stays in float32
when float16 is requested (the SDXL VAE overflows in float16), unless a separate, fp16-safe VAE
is named.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import attrs
import torch

from cnet_models.configs import BaseModelConfig, looks_local
from cnet_models.facade import (
    AutoencoderKL,
    CLIPTokenizer,
    DDPMScheduler,
    ModelFolderError,
    TextEncoder,
    UNet2DConditionModel,
    checked,
    diffusers_dtype,
    load_scheduler,
    load_text_encoder,
    load_tokenizer,
    load_unet,
    load_vae,
    load_vae_config,
    pipeline_from_single_file,
)
from cnet_models.families import ModelFamily, detect_family, family_by_name
from cnet_models.single_file import checked_single_file, checkpoint_family
from cnet_models.text import PromptEncoder

logger = logging.getLogger(__name__)


@attrs.define
class BaseModel:
    """The frozen parts of a base model and what its folder says about itself."""

    family: ModelFamily
    source: str
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoders: tuple[TextEncoder, ...]
    tokenizers: tuple[CLIPTokenizer, ...]
    scheduler: DDPMScheduler
    """The training noise scheduler, from the folder's `scheduler/` config."""

    @property
    def prediction_type(self) -> str:
        return str(self.scheduler.config["prediction_type"])

    @property
    def vae_scaling_factor(self) -> float:
        return float(self.vae.config["scaling_factor"])

    @property
    def vae_force_upcast(self) -> bool:
        return bool(self.vae.config.get("force_upcast", False))

    @property
    def cross_attention_dim(self) -> int:
        return int(self.unet.config["cross_attention_dim"])

    def prompt_encoder(self) -> PromptEncoder:
        return PromptEncoder(self.family, self.tokenizers, self.text_encoders)

    def frozen_modules(self) -> tuple[torch.nn.Module, ...]:
        """The UNet, the VAE and the text encoders: every module with weights."""
        return (self.unet, self.vae, *self.text_encoders)

    def to_device(self, device: torch.device, *, text_encoders: bool = True) -> None:
        """Move every frozen part to `device`, each keeping its own dtype; with
        `text_encoders=False` the text encoders go to (or stay on) the CPU instead: a run that
        reads its embeddings from a cache needs them only to render, now and then."""
        image_parts: tuple[torch.nn.Module, ...] = (self.unet, self.vae)
        for part in image_parts:  # as Modules: diffusers' `to` wrapper is not callable for mypy
            part.to(device)
        for encoder in self.text_encoders:
            module: torch.nn.Module = encoder  # transformers' `to` is typed in a way mypy rejects
            module.to(device if text_encoders else torch.device("cpu"))

    @contextmanager
    def text_encoders_on(self, device: torch.device) -> Iterator[None]:
        """The text encoders on `device` for the duration, then back where each was."""
        modules: list[torch.nn.Module] = list(self.text_encoders)
        homes = [next(m.parameters()).device for m in modules]
        for module in modules:
            module.to(device)
        try:
            yield
        finally:
            for module, home in zip(modules, homes, strict=True):
                module.to(home)


def load_base_model(config: BaseModelConfig) -> BaseModel:
    """Load and freeze the parts of `config.source`; errors name the folder and the part."""
    if config.single_file:
        return _load_single_file(config)
    _check_local_folder(config.source)
    common: dict[str, Any] = {
        "revision": config.revision,
        "local_files_only": config.local_files_only,
    }
    weights = {**common, "variant": config.variant, "use_safetensors": True}
    dtype = config.torch_dtype
    # Loading straight into the target dtype halves peak memory for half precision, and lets
    # diffusers keep the modules it must keep in float32.
    unet = load_unet(config.source, "unet", **weights, **diffusers_dtype(dtype))
    family = family_by_name(config.family) if config.family else detect_family(unet.config)
    vae = _load_vae(config, weights, common, _vae_dtype(config, dtype, common))
    encoders = tuple(
        load_text_encoder(family.has_projection(i), config.source, sub, **weights, dtype=dtype)
        for i, sub in enumerate(family.text_encoders)
    )
    tokenizers = tuple(load_tokenizer(config.source, sub, **common) for sub in family.tokenizers)
    scheduler = load_scheduler(config.source, "scheduler", **common)
    model = BaseModel(family, config.source, unet, vae, encoders, tokenizers, scheduler)
    for part in (unet, vae, *encoders):
        _freeze(part)
    return model


def _load_single_file(config: BaseModelConfig) -> BaseModel:
    """The parts of a single-file checkpoint, converted by diffusers (`single_file`)."""
    path = checked_single_file(config.source)
    family_name = config.family or checkpoint_family(path)
    family = family_by_name(family_name)
    described = attrs.evolve(config, family=family_name).described_by
    common: dict[str, Any] = {"local_files_only": config.local_files_only}
    dtype = config.torch_dtype
    pipe = pipeline_from_single_file(
        family.pipeline, path, described, dtype=dtype, local_files_only=config.local_files_only
    )
    unet = checked(pipe.unet, UNet2DConditionModel, f"the UNet of {path}")
    as_folder = attrs.evolve(config, source=described, revision=None, variant=None)
    vae_dtype = _vae_dtype(as_folder, dtype, common)
    vae = (
        checked(pipe.vae, AutoencoderKL, f"the VAE of {path}").to(vae_dtype)
        if config.vae is None
        else _load_vae(config, {**common, "use_safetensors": True}, common, vae_dtype)
    )
    encoders = tuple(getattr(pipe, sub) for sub in family.text_encoders)
    tokenizers = tuple(getattr(pipe, sub) for sub in family.tokenizers)
    scheduler = load_scheduler(described, "scheduler", **common)
    model = BaseModel(family, config.source, unet, vae, encoders, tokenizers, scheduler)
    for part in (unet, vae, *encoders):
        _freeze(part)
    return model


def _check_local_folder(source: str) -> None:
    """A source that names a folder (see `looks_local`) must be one: a hub lookup of a
    mistyped path retries for a minute and then reports a missing `config.json`."""
    path = Path(source).expanduser()
    if looks_local(source) and not path.is_dir():
        raise ModelFolderError(f"model folder {source} does not exist")
    if path.is_dir() and not (path / "model_index.json").is_file() and not (path / "unet").is_dir():
        raise ModelFolderError(
            f"{source} is not a diffusers model folder (no model_index.json and no unet/)"
        )


def _load_vae(
    config: BaseModelConfig, weights: dict[str, Any], common: dict[str, Any], dtype: torch.dtype
) -> AutoencoderKL:
    if config.vae is None:
        return load_vae(config.source, "vae", **weights, **diffusers_dtype(dtype))
    # A standalone VAE is a folder (or hub id) of its own, without a vae/ subfolder.
    return load_vae(config.vae, None, **common, **diffusers_dtype(dtype), use_safetensors=True)


def _vae_dtype(config: BaseModelConfig, dtype: torch.dtype, common: dict[str, Any]) -> torch.dtype:
    """float16 unless the folder's own VAE asks for float32 (`force_upcast`) and no separate
    VAE is named; a named VAE is assumed fp16-safe (that is why one names it)."""
    if dtype != torch.float16 or config.vae is not None:
        return dtype
    if load_vae_config(config.source, "vae", **common).get("force_upcast", False):
        logger.warning(
            "the VAE of %s asks for float32 (force_upcast): it stays in float32; name an "
            "fp16-safe VAE (model.vae) to run it in float16",
            config.source,
        )
        return torch.float32
    return dtype


def _freeze(part: torch.nn.Module) -> None:
    part.requires_grad_(False)
    part.eval()
