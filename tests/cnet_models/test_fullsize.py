"""Full-size architectures from the shipped configs, built on the meta device (no memory)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from cnet_models.families import FAMILY_NAMES, detect_family, family_by_name
from cnet_models.fullsize import (
    FullSizeModels,
    arch_parts,
    build_fullsize,
    load_arch_config,
    parameter_count,
)

# Millions of parameters of the public models (rounded to 0.1M).
EXPECTED_MILLIONS = [
    ("sd15", "unet", 859.5),
    ("sd15", "controlnet", 361.3),
    ("sd15", "vae", 83.7),
    ("sd15", "text_encoder", 123.1),  # CLIP ViT-L/14 text
    ("sd21", "unet", 865.9),
    ("sd21", "controlnet", 364.2),
    ("sd21", "text_encoder", 340.4),  # OpenCLIP ViT-H text, last layer cut
    ("sdxl", "unet", 2567.5),
    ("sdxl", "controlnet", 1251.0),
    ("sdxl", "text_encoder", 123.1),
    ("sdxl", "text_encoder_2", 694.7),  # OpenCLIP bigG text with projection
]


@pytest.fixture(scope="module")
def built() -> Callable[[str], FullSizeModels]:
    """One meta-device build per family, shared by the tests of this module."""
    cache: dict[str, FullSizeModels] = {}

    def get(family: str) -> FullSizeModels:
        if family not in cache:
            cache[family] = build_fullsize(family)
        return cache[family]

    return get


def _part(models: FullSizeModels, family: str, part: str) -> torch.nn.Module:
    encoders = family_by_name(family).text_encoders
    if part in encoders:
        return models.text_encoders[encoders.index(part)]
    module = getattr(models, part)
    assert isinstance(module, torch.nn.Module)
    return module


@pytest.mark.parametrize(("family", "part", "millions"), EXPECTED_MILLIONS)
def test_parameter_counts_match_the_public_models(
    built: Callable[[str], FullSizeModels], family: str, part: str, millions: float
) -> None:
    module = _part(built(family), family, part)
    count = parameter_count(module)
    print(f"{family} {part}: {count / 1e6:.2f}M")
    assert round(count / 1e6, 1) == millions


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_built_on_meta_allocates_nothing(
    built: Callable[[str], FullSizeModels], family: str
) -> None:
    models = built(family)
    assert models.controlnet is not None
    modules = [models.unet, models.vae, *models.text_encoders, models.controlnet]
    assert all(p.is_meta for m in modules for p in m.parameters())
    assert len(models.text_encoders) == len(family_by_name(family).text_encoders)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_unet_config_is_detected_as_its_family(family: str) -> None:
    assert detect_family(load_arch_config(family, "unet")).name == family


def test_sdxl_configs_fit_together() -> None:
    unet = load_arch_config("sdxl", "unet")
    first = load_arch_config("sdxl", "text_encoder")
    second = load_arch_config("sdxl", "text_encoder_2")
    assert unet["cross_attention_dim"] == first["hidden_size"] + second["hidden_size"]
    expected = 6 * unet["addition_time_embed_dim"] + second["projection_dim"]
    assert unet["projection_class_embeddings_input_dim"] == expected


@pytest.mark.parametrize(
    ("family", "prediction"), [("sd15", "epsilon"), ("sd21", "v_prediction"), ("sdxl", "epsilon")]
)
def test_scheduler_prediction_type(family: str, prediction: str) -> None:
    assert load_arch_config(family, "scheduler")["prediction_type"] == prediction


def test_dtype_is_applied() -> None:
    models = build_fullsize("sd15", dtype=torch.float16, with_controlnet=False)
    assert models.controlnet is None
    assert {p.dtype for p in models.unet.parameters()} == {torch.float16}
    assert {p.dtype for p in models.text_encoders[0].parameters()} == {torch.float16}


def test_configs_are_fresh_copies() -> None:
    load_arch_config("sd15", "unet")["cross_attention_dim"] = 1
    assert load_arch_config("sd15", "unet")["cross_attention_dim"] == 768


def test_every_part_has_a_config() -> None:
    for family in FAMILY_NAMES:
        for part in arch_parts(family):
            assert load_arch_config(family, part)


def test_unknown_part_or_family_is_refused() -> None:
    with pytest.raises(ValueError, match="text_encoder_2"):
        load_arch_config("sd15", "text_encoder_2")
    with pytest.raises(ValueError, match="unknown model family"):
        load_arch_config("sd3", "unet")
