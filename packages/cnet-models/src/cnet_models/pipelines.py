"""The diffusers ControlNet pipeline of a family, assembled from loaded parts (no reload)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from cnet_models.facade import (
    CLIPTextModel,
    CLIPTextModelWithProjection,
    ControlNetModel,
    EulerDiscreteScheduler,
    StableDiffusionControlNetPipeline,
    StableDiffusionXLControlNetPipeline,
    checked,
)
from cnet_models.loading import BaseModel

ControlNetPipeline = StableDiffusionControlNetPipeline | StableDiffusionXLControlNetPipeline


def controlnet_pipeline(base: BaseModel, controlnet: ControlNetModel) -> ControlNetPipeline:
    """The family's ControlNet pipeline over the same module objects (an Euler scheduler made
    from the training scheduler's config); what users will run the exported ControlNet with."""
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
    pipe.set_progress_bar_config(disable=True)  # type: ignore[no-untyped-call]
    return pipe


@torch.no_grad()
def generate(
    pipe: ControlNetPipeline,
    prompts: Sequence[str],
    images: Sequence[Image.Image],
    *,
    resolution: int,
    steps: int,
    guidance_scale: float,
    seeds: Sequence[int],
) -> list[Image.Image]:
    """One image per (prompt, conditioning image, seed), each from its own seeded generator
    (an image does not depend on which other prompts are rendered with it, or where)."""
    out = []
    device = pipe.unet.device
    for prompt, image, seed in zip(prompts, images, seeds, strict=True):
        result = pipe(
            prompt,
            image=image.convert("RGB").resize((resolution, resolution)),
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            height=resolution,
            width=resolution,
            output_type="np",
            generator=torch.Generator(device=device).manual_seed(seed),
        )
        array = np.asarray(result.images[0])
        out.append(Image.fromarray((np.clip(array, 0, 1) * 255).round().astype(np.uint8)))
    return out
