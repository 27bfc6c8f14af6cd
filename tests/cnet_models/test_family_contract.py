"""The contract every registered model family keeps, run on each of them.

Parametrized over `registered_families()`, so a new family is tested by registering it: its
tiny model writes and loads, its prompts encode as its diffusers pipeline encodes them, its
added conditioning is there exactly when its UNet needs it and fits it, its ControlNet pipeline
renders, its full-size configs build, and its UNet configs are detected as it (by cnet-data's
copy of the rule too).
"""

from __future__ import annotations

import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import pytest
import torch
from PIL import Image

from cnet_models import facade, families
from cnet_models.conditioning import PromptEmbeddings
from cnet_models.configs import BaseModelConfig, ControlNetConfig
from cnet_models.controlled import ControlledUNet, make_controlnet
from cnet_models.families import (
    FAMILY_NAMES,
    FamilyName,
    ModelFamily,
    detect_family,
    family_by_name,
    register_family,
    registered_families,
)
from cnet_models.fullsize import build_fullsize, load_arch_config
from cnet_models.loading import BaseModel, load_base_model
from cnet_models.pipelines import controlnet_pipeline, generate

TinyModels = Callable[[str], Path]
PROMPTS = ["a red circle on a blue background", "", "a green square " * 30]
SPECS = registered_families()


def _by_name(spec: ModelFamily) -> str:
    return spec.name


@pytest.fixture(scope="module")
def loaded(tiny_models: TinyModels) -> Callable[[ModelFamily], BaseModel]:
    """`loaded(spec)`: its tiny model loaded once for this module (treat it as read-only)."""
    cache: dict[str, BaseModel] = {}

    def get(spec: ModelFamily) -> BaseModel:
        if spec.name not in cache:
            cache[spec.name] = load_base_model(BaseModelConfig(source=str(tiny_models(spec.name))))
        return cache[spec.name]

    return get


def _reference_encoding(spec: ModelFamily, folder: Path) -> PromptEmbeddings:
    """`PROMPTS` encoded by the family's own diffusers pipeline (`spec.pipeline`), loaded
    from the folder as a user would. A family with a new pipeline class adds its call here."""
    pipe: Any = getattr(facade, spec.pipeline).from_pretrained(str(folder))
    cpu = torch.device("cpu")
    if spec.pipeline == "StableDiffusionPipeline":
        embeds, _ = pipe.encode_prompt(PROMPTS, cpu, 1, False)
        return PromptEmbeddings(embeds, None)
    if spec.pipeline == "StableDiffusionXLPipeline":
        embeds, _, pooled, _ = pipe.encode_prompt(
            PROMPTS, device=cpu, do_classifier_free_guidance=False
        )
        return PromptEmbeddings(embeds, pooled)
    raise AssertionError(f"no reference encoding for pipeline {spec.pipeline} ({spec.name})")


def test_the_config_names_are_the_registered_families() -> None:
    names = tuple(spec.name for spec in SPECS)
    assert names == FAMILY_NAMES == typing.get_args(FamilyName)
    assert len(names) >= 3


@pytest.mark.parametrize("spec", SPECS, ids=_by_name)
def test_tiny_model_writes_and_loads(
    spec: ModelFamily, loaded: Callable[[ModelFamily], BaseModel]
) -> None:
    model = loaded(spec)
    assert model.family is spec
    assert len(model.text_encoders) == len(model.tokenizers) == len(spec.text_encoders)
    for index, encoder in enumerate(model.text_encoders):
        with_projection = isinstance(encoder, facade.CLIPTextModelWithProjection)
        assert with_projection == spec.has_projection(index), index
    pads = tuple(tokenizer.pad_token for tokenizer in model.tokenizers)
    assert pads == spec.tiny_pad_tokens


@pytest.mark.parametrize("spec", SPECS, ids=_by_name)
def test_prompts_encode_as_the_family_pipeline(
    spec: ModelFamily, tiny_models: TinyModels, loaded: Callable[[ModelFamily], BaseModel]
) -> None:
    model = loaded(spec)
    ours = model.prompt_encoder().encode(PROMPTS)
    theirs = _reference_encoding(spec, tiny_models(spec.name))
    assert ours.prompt_embeds.shape == (len(PROMPTS), 77, model.cross_attention_dim)
    assert torch.equal(ours.prompt_embeds, theirs.prompt_embeds)
    if theirs.pooled_prompt_embeds is None:
        assert ours.pooled_prompt_embeds is None
    else:
        assert ours.pooled_prompt_embeds is not None
        assert torch.equal(ours.pooled_prompt_embeds, theirs.pooled_prompt_embeds)
    assert model.prompt_encoder().fingerprint("x")["hidden_state"] == spec.hidden_state


@pytest.mark.parametrize("spec", SPECS, ids=_by_name)
def test_added_conditioning_is_there_exactly_when_the_unet_needs_it(
    spec: ModelFamily, loaded: Callable[[ModelFamily], BaseModel]
) -> None:
    model = loaded(spec)
    text = model.prompt_encoder().encode(["a red circle", "a dog"])
    sizes = torch.tensor([[64, 64], [96, 80]])
    added = spec.added_conditioning(text, sizes, torch.tensor([[0, 0], [16, 8]]), sizes)
    needs_added = model.unet.config.get("addition_embed_type") is not None
    assert (added is not None) == needs_added
    if added is not None:
        assert added.time_ids.shape == (2, 6)
        assert added.time_ids[1].tolist() == [96, 80, 16, 8, 96, 80]
    controlled = ControlledUNet(model.unet, make_controlnet(model.unet, ControlNetConfig()))
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    control = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        out = controlled(latents, torch.tensor([10, 500]), text.prompt_embeds, control, 1.0, added)
    assert out.shape == latents.shape and torch.isfinite(out).all()


@pytest.mark.parametrize("spec", SPECS, ids=_by_name)
def test_controlnet_pipeline_renders_an_image(
    spec: ModelFamily, loaded: Callable[[ModelFamily], BaseModel]
) -> None:
    model = loaded(spec)
    # All-zero unconditional embeddings: each family feeds them its own way (a pipeline
    # setting, or negative embeddings at each call); guidance above 1 makes them count.
    pipe = controlnet_pipeline(model, make_controlnet(model.unet, ControlNetConfig()), zeros=True)
    assert type(pipe).__name__ == spec.controlnet_pipeline
    control = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8))
    (image,) = generate(
        pipe, ["a red circle"], [control], resolution=64, steps=1, guidance_scale=3.0, seeds=[0]
    )
    assert image.size == (64, 64)
    assert np.asarray(image).std() > 0


@pytest.mark.parametrize("spec", SPECS, ids=_by_name)
def test_full_size_configs_build_on_the_meta_device(spec: ModelFamily) -> None:
    models = build_fullsize(spec.name, with_controlnet=False)
    assert all(p.is_meta for p in models.unet.parameters())
    assert len(models.text_encoders) == len(spec.text_encoders)
    for index, encoder in enumerate(models.text_encoders):
        with_projection = isinstance(encoder, facade.CLIPTextModelWithProjection)
        assert with_projection == spec.has_projection(index), index


@pytest.mark.parametrize("spec", SPECS, ids=_by_name)
def test_default_bucket_area_and_resolution(spec: ModelFamily) -> None:
    assert spec.default_bucket_area == spec.default_resolution**2


@pytest.mark.parametrize("spec", SPECS, ids=_by_name)
def test_unet_configs_are_detected_as_their_family(
    spec: ModelFamily, loaded: Callable[[ModelFamily], BaseModel]
) -> None:
    tiny = dict(loaded(spec).unet.config)
    full = load_arch_config(spec.name, "unet")
    for config in (tiny, full):
        assert detect_family(config) is spec
    assert [other.name for other in SPECS if other.matches(full)] == [spec.name]


def test_a_registered_variant_is_found_by_name_after_the_others(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(families, "_REGISTRY", dict(families.FAMILIES))
    sd21 = family_by_name("sd21")
    variant = register_family(attrs.evolve(sd21, name="sd21-512", default_resolution=512))
    assert family_by_name("sd21-512") is variant
    assert registered_families()[-1] is variant
    assert variant.default_bucket_area == 512 * 512
    # Detection asks in registration order: the earlier family still wins its configs.
    assert detect_family(load_arch_config("sd21", "unet")) is sd21
    with pytest.raises(ValueError, match="'sd21' is already registered"):
        register_family(sd21)
    with pytest.raises(ValueError, match="expected one of sd15, sd21, sdxl, sd21-512"):
        family_by_name("sd3")
