"""Prompt encoding exactly as the diffusers pipelines' `encode_prompt`, batched.

SD 1.x / 2.x: the last hidden state of the one text encoder (SD 2.x folders ship an encoder
with its last layer already removed). SDXL: the penultimate hidden states of both encoders,
concatenated along the feature axis, plus the projected pooled output of the second encoder.
Outputs keep the pipelines' dtypes (the text encoder's, the second one's for SDXL), so cached
and online embeddings agree bit for bit.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any

import attrs
import torch

from cnet_models.facade import (
    CLIPTokenizer,
    TextEncoder,
    text_encoder_outputs,
    tokenize,
    uses_attention_mask,
)
from cnet_models.families import Family


@attrs.frozen
class PromptEmbeddings:
    """What the UNet and ControlNet are conditioned on for a batch of prompts."""

    prompt_embeds: torch.Tensor
    """(batch, tokens, width): the cross-attention context."""
    pooled_prompt_embeds: torch.Tensor | None
    """(batch, projection width), SDXL only: the `text_embeds` of the added conditioning."""


def zero_rows(text: PromptEmbeddings, rows: torch.Tensor) -> PromptEmbeddings:
    """`text` with the samples where the boolean `rows` is set replaced by zeros (out of
    place: cached embeddings may be views of a read-only memory map)."""

    def zeroed(tensor: torch.Tensor) -> torch.Tensor:
        mask = rows.to(tensor.device).view(-1, *([1] * (tensor.ndim - 1)))
        return torch.where(mask, torch.zeros((), dtype=tensor.dtype, device=tensor.device), tensor)

    pooled = text.pooled_prompt_embeds
    return PromptEmbeddings(zeroed(text.prompt_embeds), None if pooled is None else zeroed(pooled))


class PromptEncoder:
    """Encodes prompts for one family with its tokenizers and (frozen) text encoders."""

    def __init__(
        self,
        family: Family,
        tokenizers: Sequence[CLIPTokenizer],
        text_encoders: Sequence[TextEncoder],
    ) -> None:
        if len(tokenizers) != len(family.tokenizers) or len(text_encoders) != len(
            family.text_encoders
        ):
            raise ValueError(
                f"family {family.name} needs {len(family.text_encoders)} text encoder(s) and "
                f"tokenizer(s), got {len(text_encoders)} and {len(tokenizers)}"
            )
        self.family = family
        self.tokenizers = tuple(tokenizers)
        self.text_encoders = tuple(text_encoders)
        self._empty: PromptEmbeddings | None = None

    @property
    def device(self) -> torch.device:
        return self.text_encoders[0].device

    def empty_prompt(self) -> PromptEmbeddings:
        """The embedding of "" (batch of one): the unconditional input of the SD 1.x / 2.x
        pipelines, and what the diffusers training scripts drop captions to."""
        if self._empty is None:
            self._empty = self.encode([""])
        return self._empty

    def unconditional(self, zeros: bool) -> PromptEmbeddings:
        """The unconditional input (batch of one): the empty prompt's embedding, or all-zero
        embeddings of its shapes and dtypes (pooled too), as SDXL's pipelines feed with
        `force_zeros_for_empty_prompt`."""
        empty = self.empty_prompt()
        return zero_rows(empty, torch.ones(1, dtype=torch.bool)) if zeros else empty

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> PromptEmbeddings:
        prompts = list(prompts)
        if self.family.uses_penultimate_hidden_state:
            return self._encode_sdxl(prompts)
        return self._encode_sd(prompts)

    def _encode_sd(self, prompts: list[str]) -> PromptEmbeddings:
        (tokenizer,), (encoder,) = self.tokenizers, self.text_encoders
        ids, mask = tokenize(tokenizer, prompts)
        attention = mask.to(encoder.device) if uses_attention_mask(encoder) else None
        last, _ = text_encoder_outputs(encoder, ids.to(encoder.device), attention)
        return PromptEmbeddings(last.to(dtype=encoder.dtype), None)

    def _encode_sdxl(self, prompts: list[str]) -> PromptEmbeddings:
        hidden_states = []
        pooled = None
        for tokenizer, encoder in zip(self.tokenizers, self.text_encoders, strict=True):
            ids, _ = tokenize(tokenizer, prompts)
            first, hidden = text_encoder_outputs(encoder, ids.to(encoder.device))
            if pooled is None and first.ndim == 2:  # the projected pooled output
                pooled = first
            hidden_states.append(hidden[-2])
        if pooled is None:
            raise ValueError("SDXL needs a text encoder with projection as its last encoder")
        last_dtype = self.text_encoders[-1].dtype
        embeds = torch.cat(hidden_states, dim=-1).to(dtype=last_dtype)
        return PromptEmbeddings(embeds, pooled)

    def fingerprint(self, model: str) -> dict[str, Any]:
        """What an embedding cache must match: model identity, tokenizers, hidden-state choice,
        dtype and shapes, plus a digest of each encoder's config and a sample of its weights
        (so a different checkpoint under the same name is caught)."""
        return {
            "model": model,
            "family": self.family.name,
            "hidden_state": "penultimate" if self.family.uses_penultimate_hidden_state else "last",
            "max_length": [t.model_max_length for t in self.tokenizers],
            "tokenizers": [_tokenizer_digest(t) for t in self.tokenizers],
            "text_encoders": [_encoder_digest(e) for e in self.text_encoders],
            "dtype": str(self.text_encoders[-1].dtype).removeprefix("torch."),
        }


_LOCATION_KEYS = frozenset({"_name_or_path", "transformers_version", "_commit_hash"})


def _tokenizer_digest(tokenizer: CLIPTokenizer) -> str:
    vocab = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False)
    return hashlib.blake2b(vocab.encode("utf-8"), digest_size=8).hexdigest()


def _encoder_digest(encoder: TextEncoder) -> str:
    digest = hashlib.blake2b(digest_size=8)
    config = {
        key: value
        for key, value in encoder.config.to_dict().items()
        if key not in _LOCATION_KEYS  # the same weights moved or re-saved stay the same
    }
    digest.update(json.dumps(config, sort_keys=True, default=str).encode("utf-8"))
    # A sample of the weights: the first and last parameter tensors, a few rows each.
    params = list(encoder.parameters())
    for param in (params[0], params[-1]):
        sample = param.detach().flatten()[:4096].to("cpu", torch.float32)
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()
