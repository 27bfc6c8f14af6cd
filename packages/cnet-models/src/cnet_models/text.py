"""Prompt encoding exactly as the diffusers pipelines' `encode_prompt`, batched.

How a family encodes (which encoders, which hidden state, whether a pooled output) is its
spec's `encode_prompts`; this module holds the encoders and adds what every family shares: the
empty prompt, the unconditional input and the cache fingerprint. Outputs keep the pipelines'
dtypes (the text encoder's, the last one's for SDXL), so cached and online embeddings agree
bit for bit.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any

import torch

from cnet_models.conditioning import PromptEmbeddings, zero_rows
from cnet_models.facade import CLIPTokenizer, TextEncoder
from cnet_models.families import ModelFamily

__all__ = ["PromptEmbeddings", "PromptEncoder", "zero_rows"]
"""`PromptEmbeddings` and `zero_rows` live in `cnet_models.conditioning`; kept importable here."""


class PromptEncoder:
    """Encodes prompts for one family with its tokenizers and (frozen) text encoders."""

    def __init__(
        self,
        family: ModelFamily,
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
        return self.family.encode_prompts(self.tokenizers, self.text_encoders, list(prompts))

    def fingerprint(self, model: str) -> dict[str, Any]:
        """What an embedding cache must match: model identity, tokenizers, hidden-state choice,
        dtype and shapes, plus a digest of each encoder's config and a sample of its weights
        (so a different checkpoint under the same name is caught)."""
        return {
            "model": model,
            "family": self.family.name,
            "hidden_state": self.family.hidden_state,
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
