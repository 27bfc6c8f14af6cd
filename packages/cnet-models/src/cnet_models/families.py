"""Model families: what differs between SD 1.5, SD 2.1 and SDXL, and how to tell them apart.

A family holds only what is a property of the architecture. Everything a model folder states
about itself (prediction type, VAE scaling factor, `force_upcast`, cross-attention width) is read
from that folder when it is loaded, never assumed from the family.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import attrs

FamilyName = Literal["sd15", "sd21", "sdxl"]
FAMILY_NAMES: tuple[FamilyName, ...] = ("sd15", "sd21", "sdxl")

UnconditionalChoice = Literal["auto", "empty_prompt", "zeros"]
"""What stands in for a dropped caption (and for the unconditional input at validation):
`auto` is what the family's pipeline does at inference (`zeros_for_empty_prompt`), the other
two force the encoded empty prompt or all-zero embeddings."""


@attrs.frozen
class Family:
    """What an architecture family fixes."""

    name: FamilyName
    text_encoders: tuple[str, ...]
    """Subfolders of the text encoders, in the order their outputs are concatenated."""
    tokenizers: tuple[str, ...]
    """Subfolders of the matching tokenizers."""
    uses_penultimate_hidden_state: bool
    """SDXL conditions on the penultimate hidden states of both encoders (SD 2.x folders cut
    the last layer from the encoder itself, so their last hidden state is already right)."""
    added_conditioning: bool
    """SDXL's `text_embeds` (pooled output of the last encoder) and `time_ids` (sizes, crop)."""
    default_resolution: int
    """Side of the square training resolution the base model was trained at."""
    upcast_attention_in_half: bool
    """SD 2.x overflows in float16 attention unless attention is computed in float32."""
    pipeline: str
    """The diffusers text-to-image pipeline class of the family."""
    controlnet_pipeline: str
    """The diffusers ControlNet pipeline class of the family."""
    zeros_for_empty_prompt: bool | None
    """What the family's pipeline feeds as the unconditional input of classifier-free guidance
    when no negative prompt is given. None: the pipeline has no choice, it encodes the empty
    prompt (SD 1.x / 2.x). True or False: the default of the pipeline's
    `force_zeros_for_empty_prompt` (SDXL: True, all-zero embeddings, pooled too), which a model
    folder's `model_index.json` may set otherwise (see `zeros_for_empty_prompt`)."""


FAMILIES: Mapping[FamilyName, Family] = {
    "sd15": Family(
        name="sd15",
        text_encoders=("text_encoder",),
        tokenizers=("tokenizer",),
        uses_penultimate_hidden_state=False,
        added_conditioning=False,
        default_resolution=512,
        upcast_attention_in_half=False,
        pipeline="StableDiffusionPipeline",
        controlnet_pipeline="StableDiffusionControlNetPipeline",
        zeros_for_empty_prompt=None,
    ),
    "sd21": Family(
        name="sd21",
        text_encoders=("text_encoder",),
        tokenizers=("tokenizer",),
        uses_penultimate_hidden_state=False,
        added_conditioning=False,
        default_resolution=768,
        upcast_attention_in_half=True,
        pipeline="StableDiffusionPipeline",
        controlnet_pipeline="StableDiffusionControlNetPipeline",
        zeros_for_empty_prompt=None,
    ),
    "sdxl": Family(
        name="sdxl",
        text_encoders=("text_encoder", "text_encoder_2"),
        tokenizers=("tokenizer", "tokenizer_2"),
        uses_penultimate_hidden_state=True,
        added_conditioning=True,
        default_resolution=1024,
        upcast_attention_in_half=False,
        pipeline="StableDiffusionXLPipeline",
        controlnet_pipeline="StableDiffusionXLControlNetPipeline",
        zeros_for_empty_prompt=True,
    ),
}


class FamilyDetectionError(ValueError):
    """A UNet config that matches no known family; name the family explicitly instead."""


def detect_family(unet_config: Mapping[str, Any]) -> Family:
    """The family of a UNet, from structural fields of its config (tiny models included).

    SDXL: `addition_embed_type == "text_time"`. SD 2.x: linear projections in its transformer
    blocks (`use_linear_projection`), or its 1024-wide cross-attention. SD 1.x: neither.
    """
    if unet_config.get("addition_embed_type") == "text_time":
        return FAMILIES["sdxl"]
    if unet_config.get("addition_embed_type") not in (None, ""):
        raise FamilyDetectionError(
            f"UNet has addition_embed_type {unet_config.get('addition_embed_type')!r}, which "
            f"no supported family uses; pass the family explicitly if it is one of "
            f"{', '.join(FAMILY_NAMES)}"
        )
    if unet_config.get("use_linear_projection") or unet_config.get("cross_attention_dim") == 1024:
        return FAMILIES["sd21"]
    return FAMILIES["sd15"]


def family_by_name(name: str) -> Family:
    if name not in FAMILIES:
        raise ValueError(
            f"unknown model family {name!r}; expected one of {', '.join(FAMILY_NAMES)}"
        )
    return FAMILIES[name]  # type: ignore[index]


def zeros_for_empty_prompt(family: Family, model_index: Mapping[str, Any] | None) -> bool:
    """Whether the family's pipeline, loaded from a folder with this `model_index.json` (None:
    none could be read), conditions the unconditional branch of CFG on all-zero embeddings.

    The folder's `force_zeros_for_empty_prompt` counts only where the pipeline reads it (SDXL);
    the SD 1.x / 2.x pipelines always encode the empty prompt, whatever the folder says.
    """
    default = family.zeros_for_empty_prompt
    if default is None:
        return False
    stored = (model_index or {}).get("force_zeros_for_empty_prompt")
    return default if stored is None else bool(stored)


def unconditional_zeros(
    choice: UnconditionalChoice, family: Family, model_index: Mapping[str, Any] | None
) -> bool:
    """Whether `choice` means all-zero embeddings for this family and folder."""
    if choice == "auto":
        return zeros_for_empty_prompt(family, model_index)
    return choice == "zeros"
