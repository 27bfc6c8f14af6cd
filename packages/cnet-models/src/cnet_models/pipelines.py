"""The diffusers ControlNet pipeline of a family, assembled from loaded parts (no reload), and
what that pipeline feeds as the unconditional input of classifier-free guidance.

SDXL's pipelines use all-zero embeddings for it (`force_zeros_for_empty_prompt`, a setting of
the pipeline that a model folder's `model_index.json` may change); the SD 1.x / 2.x pipelines
encode the empty prompt. Caption dropout in training and the validation pipeline follow the
same choice, so that what the ControlNet learns unconditioned is what it meets at inference.
How each family builds its pipeline and feeds that choice is its spec's (`ModelFamily`).
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
    ControlNetModel,
    EulerDiscreteScheduler,
    StableDiffusionControlNetPipeline,
    StableDiffusionXLControlNetPipeline,
)
from cnet_models.families import ModelFamily, UnconditionalChoice, unconditional_zeros
from cnet_models.loading import BaseModel

ControlNetPipeline = StableDiffusionControlNetPipeline | StableDiffusionXLControlNetPipeline

_MADE: weakref.WeakKeyDictionary[ControlNetPipeline, tuple[ModelFamily, bool]] = (
    weakref.WeakKeyDictionary()
)
"""The family and the all-zeros choice of each pipeline `controlnet_pipeline` made, for
`generate` to ask the family which negative embeddings that choice needs (a pipeline class
without a setting for it takes them at each call)."""


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
    choice: UnconditionalChoice, family: ModelFamily, model: BaseModelConfig
) -> bool:
    """Whether `choice` means all-zero unconditional embeddings for `model`; `auto` reads the
    folder's `model_index.json` only for a family whose pipeline has the setting."""
    if choice != "auto":
        return unconditional_zeros(choice, family, None)
    return family.pipeline_zeros(
        lambda: read_model_index(
            model.described_by,
            revision=None if model.single_file else model.revision,
            local_files_only=model.local_files_only,
        )
    )


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
    pipe = base.family.build_controlnet_pipeline(base, controlnet, scheduler, zeros)
    _MADE[pipe] = (base.family, zeros)
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
    unconditional = _negative_embeds(pipe)
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


def _negative_embeds(pipe: ControlNetPipeline) -> torch.Tensor | None:
    """The negative embeddings the pipeline's family needs for the unconditional input it was
    made for; None: the pipeline's own (also for a pipeline made elsewhere)."""
    made = _MADE.get(pipe)
    return None if made is None else made[0].negative_prompt_embeds(pipe, made[1])
