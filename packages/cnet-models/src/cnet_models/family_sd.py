"""The single-encoder families: SD 1.x (`sd15`) and SD 2.x (`sd21`).

One CLIP text encoder whose last hidden state is the cross-attention context (SD 2.x folders
ship their OpenCLIP encoder with the last layer already removed, so the last hidden state is
the penultimate one of the full model, as trained); no added conditioning; the pipeline always
encodes the empty prompt as the unconditional input, so all-zero embeddings must be passed to
it as negative embeddings.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import attrs
import torch
from typing_extensions import override

from cnet_models.conditioning import AddedConditioning, PromptEmbeddings
from cnet_models.facade import (
    CLIPTextModel,
    CLIPTokenizer,
    ControlNetModel,
    EulerDiscreteScheduler,
    StableDiffusionControlNetPipeline,
    TextEncoder,
    checked,
    text_encoder_outputs,
    tokenize,
    uses_attention_mask,
)
from cnet_models.families import ModelFamily
from cnet_models.vocab import EOS_TOKEN

if TYPE_CHECKING:
    from cnet_models.loading import BaseModel
    from cnet_models.pipelines import ControlNetPipeline

_TINY_BLOCKS: dict[str, Any] = {
    # The real block order, cut to two: the first and the last block of each path.
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
}


@attrs.frozen(kw_only=True)
class SDFamily(ModelFamily):
    """SD 1.x / 2.x: one text encoder, its last hidden state, no added conditioning."""

    linear_projection: bool
    """SD 2.x: linear projections in the transformer blocks and a 1024-wide cross-attention
    (OpenCLIP ViT-H), what tells its UNet config from SD 1.x's (either one suffices)."""

    @property
    @override
    def hidden_state(self) -> str:
        return "last"

    @override
    def matches(self, unet_config: Mapping[str, Any]) -> bool:
        if unet_config.get("addition_embed_type") not in (None, ""):
            return False  # an added embedding: not an SD 1.x / 2.x UNet
        looks_2x = bool(unet_config.get("use_linear_projection")) or (
            unet_config.get("cross_attention_dim") == 1024
        )
        return looks_2x == self.linear_projection

    @override
    def has_projection(self, index: int) -> bool:
        return False

    @override
    def encode_prompts(
        self,
        tokenizers: Sequence[CLIPTokenizer],
        encoders: Sequence[TextEncoder],
        prompts: list[str],
    ) -> PromptEmbeddings:
        (tokenizer,), (encoder,) = tokenizers, encoders
        ids, mask = tokenize(tokenizer, prompts)
        attention = mask.to(encoder.device) if uses_attention_mask(encoder) else None
        last, _ = text_encoder_outputs(encoder, ids.to(encoder.device), attention)
        return PromptEmbeddings(last.to(dtype=encoder.dtype), None)

    @override
    def added_conditioning(
        self,
        text: PromptEmbeddings,
        original_size: torch.Tensor,
        crop_top_left: torch.Tensor,
        target_size: torch.Tensor,
    ) -> AddedConditioning | None:
        return None

    @override
    def build_controlnet_pipeline(
        self,
        base: BaseModel,
        controlnet: ControlNetModel,
        scheduler: EulerDiscreteScheduler,
        zeros: bool,
    ) -> ControlNetPipeline:
        # No setting for `zeros` (the class refuses config entries its constructor does not
        # take): `negative_prompt_embeds` passes the zeros at each call instead.
        return StableDiffusionControlNetPipeline(
            vae=base.vae,
            text_encoder=checked(base.text_encoders[0], CLIPTextModel, "text_encoder"),
            tokenizer=base.tokenizers[0],
            unet=base.unet,
            controlnet=controlnet,
            scheduler=scheduler,  # type: ignore[arg-type]  # annotated with an enum
            # None turns the checker off, as diffusers documents; its annotation omits None.
            safety_checker=None,  # type: ignore[arg-type]
            feature_extractor=None,  # type: ignore[arg-type]
            requires_safety_checker=False,
        )

    @override
    def negative_prompt_embeds(self, pipe: ControlNetPipeline, zeros: bool) -> torch.Tensor | None:
        if not zeros:
            return None  # the pipeline encodes the empty prompt itself
        sd = checked(pipe, StableDiffusionControlNetPipeline, f"{self.name} ControlNet pipeline")
        encoder = sd.text_encoder
        shape = (1, sd.tokenizer.model_max_length, encoder.config.hidden_size)
        return torch.zeros(shape, dtype=encoder.dtype, device=encoder.device)

    @override
    def tiny_unet_config(
        self, config: dict[str, Any], text_configs: Sequence[Mapping[str, Any]]
    ) -> dict[str, Any]:
        return {**config, **_TINY_BLOCKS}

    @override
    def model_index_entries(self) -> dict[str, Any]:
        return {"safety_checker": [None, None], "requires_safety_checker": False}


SD15 = SDFamily(
    name="sd15",
    text_encoders=("text_encoder",),
    tokenizers=("tokenizer",),
    default_resolution=512,
    upcast_attention_in_half=False,
    pipeline="StableDiffusionPipeline",
    controlnet_pipeline="StableDiffusionControlNetPipeline",
    zeros_for_empty_prompt=None,
    tiny_pad_tokens=(EOS_TOKEN,),
    linear_projection=False,
)
SD21 = SDFamily(
    name="sd21",
    text_encoders=("text_encoder",),
    tokenizers=("tokenizer",),
    default_resolution=768,
    upcast_attention_in_half=True,
    pipeline="StableDiffusionPipeline",
    controlnet_pipeline="StableDiffusionControlNetPipeline",
    zeros_for_empty_prompt=None,
    tiny_pad_tokens=("!",),
    linear_projection=True,
)
SPECS: tuple[ModelFamily, ...] = (SD15, SD21)
"""What `cnet_models.families` registers from this module, in this order."""
