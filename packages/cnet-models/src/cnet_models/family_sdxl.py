"""SDXL (`sdxl`): two text encoders and the text-time added conditioning.

The penultimate hidden states of both encoders, concatenated along the feature axis, are the
cross-attention context; the projected pooled output of the second encoder and six size
numbers (original size, crop top-left, target size) are the added conditioning. The pipeline
makes its own all-zero unconditional input (pooled too) under `force_zeros_for_empty_prompt`.
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
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    ControlNetModel,
    EulerDiscreteScheduler,
    StableDiffusionXLControlNetPipeline,
    TextEncoder,
    checked,
    text_encoder_outputs,
    tokenize,
)
from cnet_models.families import ModelFamily
from cnet_models.vocab import EOS_TOKEN

if TYPE_CHECKING:
    from cnet_models.loading import BaseModel
    from cnet_models.pipelines import ControlNetPipeline

TIME_IDS = 6
"""Size numbers of the added conditioning: original (h, w), crop (top, left), target (h, w)."""

_TINY_BLOCKS: dict[str, Any] = {
    # The real block order, cut to two: the first and the last block of each path.
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
    "transformer_layers_per_block": [1, 2],
    "addition_time_embed_dim": 8,
}


def sdxl_time_ids(
    original_size: torch.Tensor, crop_top_left: torch.Tensor, target_size: torch.Tensor
) -> torch.Tensor:
    """(batch, 6) time ids from per-sample (batch, 2) sizes and offsets, in the order of
    diffusers' `_get_add_time_ids`: original (h, w), crop (top, left), target (h, w)."""
    return torch.cat([original_size, crop_top_left, target_size], dim=1).to(torch.float32)


@attrs.frozen(kw_only=True)
class SDXLFamily(ModelFamily):
    """SDXL: penultimate hidden states of two encoders, pooled embedding and time ids."""

    @property
    @override
    def hidden_state(self) -> str:
        return "penultimate"

    @override
    def matches(self, unet_config: Mapping[str, Any]) -> bool:
        return unet_config.get("addition_embed_type") == "text_time"

    @override
    def has_projection(self, index: int) -> bool:
        # The last encoder carries the projection whose output is the pooled embedding.
        return index == len(self.text_encoders) - 1

    @override
    def encode_prompts(
        self,
        tokenizers: Sequence[CLIPTokenizer],
        encoders: Sequence[TextEncoder],
        prompts: list[str],
    ) -> PromptEmbeddings:
        hidden_states = []
        pooled = None
        for tokenizer, encoder in zip(tokenizers, encoders, strict=True):
            ids, _ = tokenize(tokenizer, prompts)
            first, hidden = text_encoder_outputs(encoder, ids.to(encoder.device))
            if pooled is None and first.ndim == 2:  # the projected pooled output
                pooled = first
            hidden_states.append(hidden[-2])
        if pooled is None:
            raise ValueError(
                f"family {self.name} needs a text encoder with projection as its last encoder"
            )
        embeds = torch.cat(hidden_states, dim=-1).to(dtype=encoders[-1].dtype)
        return PromptEmbeddings(embeds, pooled)

    @override
    def added_conditioning(
        self,
        text: PromptEmbeddings,
        original_size: torch.Tensor,
        crop_top_left: torch.Tensor,
        target_size: torch.Tensor,
    ) -> AddedConditioning | None:
        pooled = text.pooled_prompt_embeds
        if pooled is None:
            raise ValueError(f"family {self.name} needs the pooled prompt embedding")
        time_ids = sdxl_time_ids(original_size, crop_top_left, target_size).to(pooled.device)
        return AddedConditioning(text_embeds=pooled, time_ids=time_ids)

    @override
    def build_controlnet_pipeline(
        self,
        base: BaseModel,
        controlnet: ControlNetModel,
        scheduler: EulerDiscreteScheduler,
        zeros: bool,
    ) -> ControlNetPipeline:
        (encoder, encoder_2), (tokenizer, tokenizer_2) = base.text_encoders, base.tokenizers
        return StableDiffusionXLControlNetPipeline(
            vae=base.vae,
            text_encoder=checked(encoder, CLIPTextModel, "SDXL text_encoder"),
            text_encoder_2=checked(encoder_2, CLIPTextModelWithProjection, "SDXL text_encoder_2"),
            tokenizer=tokenizer,
            tokenizer_2=tokenizer_2,
            unet=base.unet,
            controlnet=controlnet,
            scheduler=scheduler,  # type: ignore[arg-type]  # annotated with an enum
            force_zeros_for_empty_prompt=zeros,
        )

    @override
    def negative_prompt_embeds(self, pipe: ControlNetPipeline, zeros: bool) -> torch.Tensor | None:
        return None  # `force_zeros_for_empty_prompt` makes the pipeline's own, pooled too

    @override
    def tiny_unet_config(
        self, config: dict[str, Any], text_configs: Sequence[Mapping[str, Any]]
    ) -> dict[str, Any]:
        config = {**config, **_TINY_BLOCKS}
        # Each size number is embedded, then joined by the pooled projection of the last
        # text encoder: that is the input width of the added embedding.
        pooled = text_configs[-1]["projection_dim"]
        config["projection_class_embeddings_input_dim"] = (
            TIME_IDS * config["addition_time_embed_dim"] + pooled
        )
        return config

    @override
    def model_index_entries(self) -> dict[str, Any]:
        return {"force_zeros_for_empty_prompt": True}


SDXL = SDXLFamily(
    name="sdxl",
    text_encoders=("text_encoder", "text_encoder_2"),
    tokenizers=("tokenizer", "tokenizer_2"),
    default_resolution=1024,
    upcast_attention_in_half=False,
    pipeline="StableDiffusionXLPipeline",
    controlnet_pipeline="StableDiffusionXLControlNetPipeline",
    zeros_for_empty_prompt=True,
    tiny_pad_tokens=(EOS_TOKEN, "!"),
)
SPECS: tuple[ModelFamily, ...] = (SDXL,)
"""What `cnet_models.families` registers from this module."""
