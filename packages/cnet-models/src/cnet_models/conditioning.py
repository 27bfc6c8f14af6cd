"""What the UNet and the ControlNet are conditioned on besides the latents: the text embeddings
and the added conditioning some families build from them. Plain records (torch and attrs
only), so the family specs, the text encoder and the training step share them without an
import cycle."""

from __future__ import annotations

import attrs
import torch


@attrs.frozen
class PromptEmbeddings:
    """What the UNet and ControlNet are conditioned on for a batch of prompts."""

    prompt_embeds: torch.Tensor
    """(batch, tokens, width): the cross-attention context."""
    pooled_prompt_embeds: torch.Tensor | None
    """(batch, projection width) for a family that conditions on a pooled embedding (SDXL's
    `text_embeds`); None for the others."""


def zero_rows(text: PromptEmbeddings, rows: torch.Tensor) -> PromptEmbeddings:
    """`text` with the samples where the boolean `rows` is set replaced by zeros (out of
    place: cached embeddings may be views of a read-only memory map)."""

    def zeroed(tensor: torch.Tensor) -> torch.Tensor:
        mask = rows.to(tensor.device).view(-1, *([1] * (tensor.ndim - 1)))
        return torch.where(mask, torch.zeros((), dtype=tensor.dtype, device=tensor.device), tensor)

    pooled = text.pooled_prompt_embeds
    return PromptEmbeddings(zeroed(text.prompt_embeds), None if pooled is None else zeroed(pooled))


@attrs.frozen
class AddedConditioning:
    """SDXL's micro-conditioning: pooled text embedding and time ids."""

    text_embeds: torch.Tensor
    """(batch, projection width): pooled output of the second text encoder."""
    time_ids: torch.Tensor
    """(batch, 6): original size, crop top-left, target size, as (h, w, top, left, h, w)."""

    def as_kwargs(self, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        return {"text_embeds": self.text_embeds.to(dtype), "time_ids": self.time_ids.to(dtype)}
