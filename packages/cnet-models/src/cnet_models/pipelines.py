"""The diffusers ControlNet pipeline of a family, assembled from loaded parts (no reload), and
what that pipeline feeds as the unconditional input of classifier-free guidance.

SDXL's pipelines use all-zero embeddings for it (`force_zeros_for_empty_prompt`, a setting of
the pipeline that a model folder's `model_index.json` may change); the SD 1.x / 2.x pipelines
encode the empty prompt. Caption dropout in training and the validation pipeline follow the
same choice, so that what the ControlNet learns unconditioned is what it meets at inference.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from cnet_models.configs import BaseModelConfig
from cnet_models.facade import (
    CLIPTextModel,
    CLIPTextModelWithProjection,
    ControlNetModel,
    EulerDiscreteScheduler,
    StableDiffusionControlNetPipeline,
    StableDiffusionXLControlNetPipeline,
    checked,
)
from cnet_models.families import Family, UnconditionalChoice, unconditional_zeros
from cnet_models.loading import BaseModel

ControlNetPipeline = StableDiffusionControlNetPipeline | StableDiffusionXLControlNetPipeline

_ZERO_UNCONDITIONAL: weakref.WeakSet[StableDiffusionControlNetPipeline] = weakref.WeakSet()
"""SD 1.x / 2.x pipelines made for all-zero unconditional embeddings. Their pipeline class has
no setting for it (and refuses config entries its constructor does not take), so `generate`
looks here and passes the zeros as negative embeddings."""


def read_model_index(
    source: str, *, revision: str | None = None, local_files_only: bool = True
) -> dict[str, Any] | None:
    """A model folder's (or hub id's) `model_index.json`; None where there is none to read
    (a folder of parts alone, a hub id not in the local cache when offline)."""
    try:
        # Typed as a tuple (the form with `return_unused_kwargs`); without it, a dict.
        index: object = StableDiffusionXLControlNetPipeline.load_config(
            source, revision=revision, local_files_only=local_files_only
        )
    except (OSError, ValueError):
        return None
    return dict(index) if isinstance(index, dict) else None


def unconditional_is_zeros(
    choice: UnconditionalChoice, family: Family, model: BaseModelConfig
) -> bool:
    """Whether `choice` means all-zero unconditional embeddings for `model`; `auto` reads the
    folder's `model_index.json` only for a family whose pipeline has the setting."""
    if choice != "auto" or family.zeros_for_empty_prompt is None:
        return unconditional_zeros(choice, family, None)
    index = read_model_index(
        model.source, revision=model.revision, local_files_only=model.local_files_only
    )
    return unconditional_zeros(choice, family, index)


def controlnet_pipeline(
    base: BaseModel, controlnet: ControlNetModel, *, zeros: bool | None = None
) -> ControlNetPipeline:
    """The family's ControlNet pipeline over the same module objects (an Euler scheduler made
    from the training scheduler's config); what users will run the exported ControlNet with.

    `zeros`: whether the unconditional input is all-zero embeddings rather than the encoded
    empty prompt (None: what the family's pipeline does for `base`'s folder). SDXL's pipeline
    takes it as `force_zeros_for_empty_prompt`; for SD 1.x / 2.x, which has no such option,
    `generate` passes zero negative embeddings."""
    if zeros is None:  # the folder is already loaded: no hub lookup for its index
        where = BaseModelConfig(source=base.source, local_files_only=True)
        zeros = unconditional_is_zeros("auto", base.family, where)
    scheduler = EulerDiscreteScheduler.from_config(base.scheduler.config)
    if base.family.added_conditioning:
        (encoder, encoder_2), (tokenizer, tokenizer_2) = base.text_encoders, base.tokenizers
        pipe: ControlNetPipeline = StableDiffusionXLControlNetPipeline(
            vae=base.vae,
            text_encoder=checked(encoder, CLIPTextModel, "SDXL text_encoder"),
            text_encoder_2=checked(encoder_2, CLIPTextModelWithProjection, "SDXL text_encoder_2"),
            tokenizer=tokenizer,
            tokenizer_2=tokenizer_2,
            unet=base.unet,
            controlnet=controlnet,
            scheduler=scheduler,
            force_zeros_for_empty_prompt=zeros,
        )
    else:
        pipe = StableDiffusionControlNetPipeline(
            vae=base.vae,
            text_encoder=checked(base.text_encoders[0], CLIPTextModel, "text_encoder"),
            tokenizer=base.tokenizers[0],
            unet=base.unet,
            controlnet=controlnet,
            scheduler=scheduler,
            # None turns the checker off, as diffusers documents; its annotation omits None.
            safety_checker=None,  # type: ignore[arg-type]
            feature_extractor=None,  # type: ignore[arg-type]
            requires_safety_checker=False,
        )
        if zeros:
            _ZERO_UNCONDITIONAL.add(pipe)
    pipe.set_progress_bar_config(disable=True)  # type: ignore[no-untyped-call]
    return pipe


@torch.no_grad()
def generate(
    pipe: ControlNetPipeline,
    prompts: Sequence[str],
    images: Sequence[Image.Image],
    *,
    resolution: int | None = None,
    steps: int,
    guidance_scale: float,
    seeds: Sequence[int],
    sizes: Sequence[tuple[int, int]] | None = None,
) -> list[Image.Image]:
    """One image per (prompt, conditioning image, seed), each from its own seeded generator
    (an image does not depend on which other prompts are rendered with it, or where).

    Each image is `sizes[i]` (width, height) when given, else a `resolution` square; the
    conditioning image is resized to it (crop it to that aspect first to keep its shape)."""
    if sizes is None:
        if resolution is None:
            raise ValueError("generate needs a resolution or one size per image")
        sizes = [(resolution, resolution)] * len(prompts)
    out = []
    device = pipe.unet.device
    unconditional = _zero_negative_embeds(pipe)
    for prompt, image, seed, (width, height) in zip(prompts, images, seeds, sizes, strict=True):
        result = pipe(
            prompt,
            negative_prompt_embeds=unconditional,
            image=image.convert("RGB").resize((width, height)),
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            height=height,
            width=width,
            output_type="np",
            generator=torch.Generator(device=device).manual_seed(seed),
        )
        array = np.asarray(result.images[0])
        out.append(Image.fromarray((np.clip(array, 0, 1) * 255).round().astype(np.uint8)))
    return out


def _zero_negative_embeds(pipe: ControlNetPipeline) -> torch.Tensor | None:
    """All-zero negative embeddings for an SD 1.x / 2.x pipeline set to zeros (SDXL's pipeline
    makes its own, pooled too); None: the pipeline's own unconditional input."""
    if not isinstance(pipe, StableDiffusionControlNetPipeline) or pipe not in _ZERO_UNCONDITIONAL:
        return None
    encoder = pipe.text_encoder
    shape = (1, pipe.tokenizer.model_max_length, encoder.config.hidden_size)
    return torch.zeros(shape, dtype=encoder.dtype, device=encoder.device)
