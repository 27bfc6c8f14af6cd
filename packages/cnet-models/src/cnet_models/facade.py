"""The one place cnet touches diffusers and transformers.

Classes are imported from their concrete modules: `from diffusers import X` goes through a lazy
module whose names mypy resolves to dummy stubs. Loaders check what `from_pretrained` returned
and pin its type; forward calls return plain tensors or typed tuples, so the rest of cnet never
handles `BaseOutput` objects, `return_dict` flags or `Any`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar

import torch

import cnet_models.quiet  # noqa: F401 (first: it filters notices the imports below would print)

# isort: split
from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint
from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from diffusers.models.controlnets.controlnet import ControlNetModel
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
from diffusers.optimization import get_scheduler
from diffusers.pipelines.controlnet.pipeline_controlnet import StableDiffusionControlNetPipeline
from diffusers.pipelines.controlnet.pipeline_controlnet_sd_xl import (
    StableDiffusionXLControlNetPipeline,
)
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import StableDiffusionPipeline
from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import (
    StableDiffusionXLPipeline,
)
from diffusers.schedulers.scheduling_ddpm import DDPMScheduler
from diffusers.schedulers.scheduling_euler_discrete import EulerDiscreteScheduler
from diffusers.utils import deprecation_utils
from transformers.models.clip.configuration_clip import CLIPTextConfig
from transformers.models.clip.modeling_clip import CLIPTextModel, CLIPTextModelWithProjection
from transformers.models.clip.tokenization_clip import CLIPTokenizer

__all__ = [
    "AutoencoderKL",
    "CLIPTextConfig",
    "CLIPTextModel",
    "CLIPTextModelWithProjection",
    "CLIPTokenizer",
    "ControlNetModel",
    "ControlNetResiduals",
    "DDPMScheduler",
    "EulerDiscreteScheduler",
    "ModelFolderError",
    "StableDiffusionControlNetPipeline",
    "StableDiffusionPipeline",
    "StableDiffusionXLControlNetPipeline",
    "StableDiffusionXLPipeline",
    "TextEncoder",
    "UNet2DConditionModel",
    "checked",
    "controlnet_from_unet",
    "controlnet_weights_from_original",
    "diffusers_dtype",
    "load_component",
    "load_controlnet",
    "load_scheduler",
    "load_text_encoder",
    "load_tokenizer",
    "load_unet",
    "load_vae",
    "load_vae_config",
    "lr_scheduler",
]

TextEncoder = CLIPTextModel | CLIPTextModelWithProjection
_T = TypeVar("_T")

# diffusers renamed `torch_dtype` to `dtype` (and deprecated the old name) in recent releases;
# older ones know only `torch_dtype`. transformers takes `dtype` since 4.56.
_DIFFUSERS_DTYPE = (
    "dtype" if hasattr(deprecation_utils, "_TORCH_DTYPE_DEPRECATION_MESSAGE") else "torch_dtype"
)


def diffusers_dtype(dtype: torch.dtype) -> dict[str, torch.dtype]:
    """The keyword argument that sets the dtype in a diffusers `from_pretrained` call."""
    return {_DIFFUSERS_DTYPE: dtype}


class ModelFolderError(FileNotFoundError):
    """A model folder (or hub id) that lacks a part cnet needs, or holds the wrong kind of part."""


def checked(value: object, kind: type[_T], what: str) -> _T:
    """`value` as `kind`, or a clear error naming `what` was expected."""
    if not isinstance(value, kind):
        raise ModelFolderError(f"{what} is a {type(value).__name__}, expected {kind.__name__}")
    return value


def load_component(
    kind: type[_T],
    source: str | Path,
    subfolder: str | None,
    **kwargs: Any,
) -> _T:
    """`kind.from_pretrained(source, subfolder=...)`, checked to really be a `kind`.

    A local folder that lacks the subfolder gets a `ModelFolderError` naming both, before
    diffusers or transformers report it less directly. mypy sees the diffusers classes as
    `Any` (their `__init__` is wrapped by an untyped decorator), so callers pin the type
    through the typed loaders below.
    """
    where = f"{source}" + (f"/{subfolder}" if subfolder else "")
    local = Path(source)
    if local.exists() and subfolder and not (local / subfolder).is_dir():
        raise ModelFolderError(
            f"model folder {source} has no {subfolder}/ (needed: {kind.__name__})"
        )
    try:
        loaded = kind.from_pretrained(str(source), subfolder=subfolder, **kwargs)  # type: ignore[attr-defined]
    except (OSError, ValueError) as exc:
        raise ModelFolderError(f"cannot load {kind.__name__} from {where}: {exc}") from exc
    return checked(loaded, kind, f"{kind.__name__} loaded from {where}")


_TEXT_TO_IMAGE: dict[str, Any] = {
    "StableDiffusionPipeline": StableDiffusionPipeline,
    "StableDiffusionXLPipeline": StableDiffusionXLPipeline,
}


def pipeline_from_single_file(
    pipeline: str, path: Path, config: str, *, dtype: torch.dtype, local_files_only: bool
) -> Any:
    """The text-to-image pipeline `pipeline` (a family's `pipeline` class name) with the parts
    of a single-file checkpoint, converted by diffusers' own `from_single_file` with the
    configs and tokenizers of `config`; `Any` like the pipelines' untyped attributes (the
    caller checks each part)."""
    cls = _TEXT_TO_IMAGE[pipeline]
    # SD 1.x / 2.x pipelines load a safety checker unless told not to; training needs none.
    no_checker = (
        {"safety_checker": None, "requires_safety_checker": False}
        if cls is StableDiffusionPipeline
        else {}
    )
    try:
        return cls.from_single_file(
            str(path),
            config=config,
            torch_dtype=dtype,
            local_files_only=local_files_only,
            **no_checker,
        )
    except (OSError, ValueError) as exc:
        raise ModelFolderError(
            f"cannot load the single-file checkpoint {path} described by {config}: {exc}"
        ) from exc


def load_unet(source: str | Path, subfolder: str | None, **kwargs: Any) -> UNet2DConditionModel:
    unet: UNet2DConditionModel = load_component(UNet2DConditionModel, source, subfolder, **kwargs)
    return unet


def load_vae(source: str | Path, subfolder: str | None, **kwargs: Any) -> AutoencoderKL:
    vae: AutoencoderKL = load_component(AutoencoderKL, source, subfolder, **kwargs)
    return vae


def load_vae_config(source: str | Path, subfolder: str | None, **kwargs: Any) -> dict[str, Any]:
    """The VAE's config alone (no weights), from a folder or the hub."""
    try:
        config = AutoencoderKL.load_config(str(source), subfolder=subfolder, **kwargs)
    except (OSError, ValueError) as exc:
        raise ModelFolderError(f"cannot read the VAE config of {source}: {exc}") from exc
    return dict(checked(config, dict, f"VAE config of {source}"))


def load_controlnet(source: str | Path, subfolder: str | None, **kwargs: Any) -> ControlNetModel:
    controlnet: ControlNetModel = load_component(ControlNetModel, source, subfolder, **kwargs)
    return controlnet


def controlnet_weights_from_original(
    stored: dict[str, torch.Tensor], config: dict[str, Any]
) -> dict[str, torch.Tensor]:
    """diffusers' own reading of an original-layout ControlNet state dict (what
    `ControlNetModel.from_single_file` loads): the judge of cnet's single-file export."""
    converted = convert_controlnet_checkpoint(stored, config)  # type: ignore[no-untyped-call]
    return dict(converted)


def load_scheduler(source: str | Path, subfolder: str | None, **kwargs: Any) -> DDPMScheduler:
    scheduler: DDPMScheduler = load_component(DDPMScheduler, source, subfolder, **kwargs)
    return scheduler


def load_tokenizer(source: str | Path, subfolder: str | None, **kwargs: Any) -> CLIPTokenizer:
    tokenizer: CLIPTokenizer = load_component(CLIPTokenizer, source, subfolder, **kwargs)
    return tokenizer


def load_text_encoder(
    with_projection: bool, source: str | Path, subfolder: str | None, **kwargs: Any
) -> TextEncoder:
    """SDXL's second encoder carries the projection whose output is the pooled embedding."""
    encoder: TextEncoder
    with _no_weight_loading_bar():
        if with_projection:
            encoder = load_component(CLIPTextModelWithProjection, source, subfolder, **kwargs)
        else:
            encoder = load_component(CLIPTextModel, source, subfolder, **kwargs)
    return encoder


def controlnet_from_unet(
    unet: UNet2DConditionModel,
    *,
    conditioning_channels: int = 3,
    conditioning_embedding_out_channels: tuple[int, ...] | None = None,
) -> ControlNetModel:
    """A new ControlNet: the UNet's encoder copied, zero-initialised output convolutions."""
    extra = (
        {}
        if conditioning_embedding_out_channels is None
        else {"conditioning_embedding_out_channels": conditioning_embedding_out_channels}
    )
    controlnet: ControlNetModel = checked(
        ControlNetModel.from_unet(unet, conditioning_channels=conditioning_channels, **extra),
        ControlNetModel,
        "ControlNetModel.from_unet result",
    )
    return controlnet


ControlNetResiduals = tuple[tuple[torch.Tensor, ...], torch.Tensor]
"""(down-block residuals, mid-block residual) as a ControlNet returns them."""


def controlnet_forward(
    controlnet: ControlNetModel,
    sample: torch.Tensor,
    timesteps: torch.Tensor,
    *,
    encoder_hidden_states: torch.Tensor,
    controlnet_cond: torch.Tensor,
    conditioning_scale: float,
    added_cond_kwargs: dict[str, torch.Tensor] | None,
) -> ControlNetResiduals:
    out = controlnet(
        sample,
        timesteps,
        encoder_hidden_states=encoder_hidden_states,
        controlnet_cond=controlnet_cond,
        conditioning_scale=conditioning_scale,
        added_cond_kwargs=added_cond_kwargs,
        return_dict=False,
    )
    down, mid = out
    return tuple(down), mid


def unet_forward(
    unet: UNet2DConditionModel,
    sample: torch.Tensor,
    timesteps: torch.Tensor,
    *,
    encoder_hidden_states: torch.Tensor,
    added_cond_kwargs: dict[str, torch.Tensor] | None,
    residuals: ControlNetResiduals | None,
) -> torch.Tensor:
    down, mid = residuals if residuals is not None else (None, None)
    out = unet(
        sample,
        timesteps,
        encoder_hidden_states=encoder_hidden_states,
        added_cond_kwargs=added_cond_kwargs,
        down_block_additional_residuals=down,
        mid_block_additional_residual=mid,
        return_dict=False,
    )
    return checked(out[0], torch.Tensor, "UNet output")


def vae_encode_mean_and_sample(
    vae: AutoencoderKL, images: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """A sample of the VAE's latent distribution for `images` in [-1, 1] (unscaled)."""
    return vae_sample_from_moments(vae_moments(vae, images), generator)


def vae_moments(vae: AutoencoderKL, images: torch.Tensor) -> torch.Tensor:
    """The VAE's latent distribution for `images` in [-1, 1]: (B, 2C, h, w), the means then the
    log-variances, as the encoder leaves them (what a latent cache stores)."""
    out = vae.encode(images, return_dict=False)
    return checked(out[0].parameters, torch.Tensor, "VAE latent moments")


def vae_sample_from_moments(
    moments: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """A sample of the latent distribution `moments` describe (unscaled): the same draw, bit for
    bit, as sampling the distribution the encoder returned."""
    distribution = DiagonalGaussianDistribution(moments)
    return checked(distribution.sample(generator=generator), torch.Tensor, "VAE latent sample")


def tokenize(tokenizer: CLIPTokenizer, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(token ids, attention mask), each (batch, model_max_length): padded to the maximum length
    and truncated, exactly as the diffusers pipelines tokenize prompts."""
    encoded = tokenizer(
        prompts,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    )
    ids = checked(encoded.input_ids, torch.Tensor, "token ids")
    return ids, checked(encoded.attention_mask, torch.Tensor, "attention mask")


def text_encoder_outputs(
    encoder: TextEncoder, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """(first output, all hidden states): the first output is the last hidden state of a
    `CLIPTextModel` and the projected pooled embedding of a `CLIPTextModelWithProjection`."""
    out = encoder(input_ids, attention_mask=attention_mask, output_hidden_states=True)
    hidden = out.hidden_states
    if hidden is None:
        raise RuntimeError(f"{type(encoder).__name__} returned no hidden states")
    return checked(out[0], torch.Tensor, "text encoder output"), tuple(hidden)


def uses_attention_mask(encoder: TextEncoder) -> bool:
    return bool(getattr(encoder.config, "use_attention_mask", False))


@contextlib.contextmanager
def _no_weight_loading_bar() -> Iterator[None]:
    """transformers' progress bars off inside the block, as they were after it: its "Loading
    weights" bar over a text encoder's tensors is done in a moment and repeats once per encoder
    at every launch (downloads keep their own bars: those are huggingface_hub's)."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()  # type: ignore[no-untyped-call]


def lr_scheduler(
    name: str,
    optimizer: torch.optim.Optimizer,
    *,
    warmup_steps: int,
    training_steps: int,
    num_cycles: int = 1,
    power: float = 1.0,
) -> torch.optim.lr_scheduler.LambdaLR:
    """diffusers' learning-rate schedule `name` (`constant`, `constant_with_warmup`, `linear`,
    `cosine`, `cosine_with_restarts`, `polynomial`), stepped once per optimizer step."""
    return get_scheduler(
        name,
        optimizer,
        num_warmup_steps=warmup_steps,
        num_training_steps=training_steps,
        num_cycles=num_cycles,
        power=power,
    )
