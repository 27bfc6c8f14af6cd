"""Prompt encoding equals the diffusers pipelines' own `encode_prompt`, bit for bit."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from cnet_models.configs import DTYPES, BaseModelConfig
from cnet_models.facade import (
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    diffusers_dtype,
)
from cnet_models.loading import load_base_model

TinyModels = Callable[[str], Path]
PROMPTS = ["a red circle on a blue background", "", "a green triangle " * 30]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("family", ["sd15", "sd21"])
def test_sd_encoding_matches_the_pipeline(tiny_models: TinyModels, family: str, dtype: str) -> None:
    folder = tiny_models(family)
    model = load_base_model(BaseModelConfig(source=str(folder), frozen_dtype=dtype))  # type: ignore[arg-type]
    ours = model.prompt_encoder().encode(PROMPTS)
    pipe = StableDiffusionPipeline.from_pretrained(str(folder), **diffusers_dtype(DTYPES[dtype]))
    theirs, _ = pipe.encode_prompt(PROMPTS, torch.device("cpu"), 1, False)
    assert ours.pooled_prompt_embeds is None
    assert ours.prompt_embeds.dtype == theirs.dtype == DTYPES[dtype]
    assert ours.prompt_embeds.shape == (3, 77, model.cross_attention_dim)
    assert torch.equal(ours.prompt_embeds, theirs)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_sdxl_encoding_matches_the_pipeline(tiny_models: TinyModels, dtype: str) -> None:
    folder = tiny_models("sdxl")
    model = load_base_model(BaseModelConfig(source=str(folder), frozen_dtype=dtype))  # type: ignore[arg-type]
    ours = model.prompt_encoder().encode(PROMPTS)
    pipe = StableDiffusionXLPipeline.from_pretrained(str(folder), **diffusers_dtype(DTYPES[dtype]))
    embeds, _, pooled, _ = pipe.encode_prompt(
        PROMPTS,  # type: ignore[arg-type]  # annotated str, documented str | list[str]
        device=torch.device("cpu"),
        do_classifier_free_guidance=False,
    )
    assert ours.pooled_prompt_embeds is not None
    assert ours.prompt_embeds.dtype == embeds.dtype
    assert ours.pooled_prompt_embeds.dtype == pooled.dtype
    assert ours.prompt_embeds.shape[-1] == model.cross_attention_dim
    assert torch.equal(ours.prompt_embeds, embeds)
    assert torch.equal(ours.pooled_prompt_embeds, pooled)


def test_batching_does_not_change_embeddings(tiny_models: TinyModels) -> None:
    encoder = load_base_model(BaseModelConfig(source=str(tiny_models("sdxl")))).prompt_encoder()
    together = encoder.encode(PROMPTS)
    alone = encoder.encode(PROMPTS[1:2])
    torch.testing.assert_close(together.prompt_embeds[1:2], alone.prompt_embeds)


def test_fingerprint_tracks_what_changes_embeddings(tiny_models: TinyModels) -> None:
    folder = str(tiny_models("sd15"))
    encoder = load_base_model(BaseModelConfig(source=folder)).prompt_encoder()
    first = encoder.fingerprint("tiny-sd15")
    assert first == load_base_model(BaseModelConfig(source=folder)).prompt_encoder().fingerprint(
        "tiny-sd15"
    )
    assert first["hidden_state"] == "last"
    assert first["max_length"] == [77]
    with torch.no_grad():
        next(encoder.text_encoders[0].parameters()).add_(1.0)
    assert encoder.fingerprint("tiny-sd15")["text_encoders"] != first["text_encoders"]
    bf16 = load_base_model(BaseModelConfig(source=folder, frozen_dtype="bfloat16"))
    assert bf16.prompt_encoder().fingerprint("tiny-sd15")["dtype"] == "bfloat16"
    sdxl = load_base_model(BaseModelConfig(source=str(tiny_models("sdxl")))).prompt_encoder()
    assert sdxl.fingerprint("x")["hidden_state"] == "penultimate"


def test_empty_prompt_is_the_encoding_of_an_empty_caption(tiny_models: TinyModels) -> None:
    encoder = load_base_model(BaseModelConfig(source=str(tiny_models("sdxl")))).prompt_encoder()
    empty = encoder.empty_prompt()
    direct = encoder.encode(["", "x"])
    assert empty.pooled_prompt_embeds is not None and direct.pooled_prompt_embeds is not None
    # Equal up to the float reordering that another batch size brings.
    torch.testing.assert_close(empty.prompt_embeds[0], direct.prompt_embeds[0])
    torch.testing.assert_close(empty.pooled_prompt_embeds[0], direct.pooled_prompt_embeds[0])
    assert encoder.empty_prompt() is empty  # computed once
