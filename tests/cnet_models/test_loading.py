"""Loading base models from diffusers folders: families, dtypes, a separate VAE, bad folders."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import attrs
import pytest
import torch

from cnet_models.configs import BaseModelConfig
from cnet_models.facade import CLIPTextModelWithProjection, ModelFolderError
from cnet_models.families import FAMILY_NAMES, FamilyDetectionError, detect_family
from cnet_models.loading import load_base_model

TinyModels = Callable[[str], Path]


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_loads_each_family_frozen_and_reads_the_folder(
    tiny_models: TinyModels, family: str
) -> None:
    folder = tiny_models(family)
    model = load_base_model(BaseModelConfig(source=str(folder), frozen_dtype="bfloat16"))
    assert model.family.name == family
    scheduler = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    vae = json.loads((folder / "vae" / "config.json").read_text())
    assert model.prediction_type == scheduler["prediction_type"]
    assert model.vae_scaling_factor == vae["scaling_factor"]
    for part in (model.unet, model.vae, *model.text_encoders):
        assert not part.training
        assert all(not p.requires_grad for p in part.parameters())
    assert model.unet.dtype == torch.bfloat16
    assert len(model.text_encoders) == len(model.tokenizers) == len(model.family.text_encoders)
    if family == "sdxl":
        assert isinstance(model.text_encoders[1], CLIPTextModelWithProjection)
    # Attention goes through torch's scaled_dot_product_attention.
    processors = {type(p).__name__ for p in model.unet.attn_processors.values()}
    assert processors == {"AttnProcessor2_0"}


def test_folder_values_are_read_not_assumed(tiny_models: TinyModels) -> None:
    model = load_base_model(BaseModelConfig(source=str(tiny_models("sd21"))))
    assert model.prediction_type == "v_prediction"
    assert model.family.upcast_attention_in_half


def test_family_override(tiny_models: TinyModels) -> None:
    model = load_base_model(BaseModelConfig(source=str(tiny_models("sd21")), family="sd15"))
    assert model.family.name == "sd15"


def test_detection_refuses_unknown_added_embeddings() -> None:
    with pytest.raises(FamilyDetectionError, match="addition_embed_type 'image'"):
        detect_family({"addition_embed_type": "image"})
    assert detect_family({"cross_attention_dim": 1024}).name == "sd21"
    assert detect_family({"cross_attention_dim": 768}).name == "sd15"


def test_separate_vae_replaces_the_folder_vae(tiny_models: TinyModels, tmp_path: Path) -> None:
    folder = tiny_models("sdxl")
    shutil.copytree(folder / "vae", tmp_path / "fixed-vae")
    config_path = tmp_path / "fixed-vae" / "config.json"
    config = json.loads(config_path.read_text())
    config.update(force_upcast=False, scaling_factor=0.5)
    config_path.write_text(json.dumps(config))
    base = BaseModelConfig(source=str(folder), frozen_dtype="float16")
    default = load_base_model(base)
    assert default.vae_force_upcast
    assert default.vae.dtype == torch.float32  # force_upcast keeps the SDXL VAE in float32
    fixed = load_base_model(attrs.evolve(base, vae=str(tmp_path / "fixed-vae")))
    assert fixed.vae_scaling_factor == 0.5
    assert fixed.vae.dtype == torch.float16


def test_bad_folders_name_the_folder_and_the_part(tiny_models: TinyModels, tmp_path: Path) -> None:
    with pytest.raises(ModelFolderError, match="does not exist"):
        load_base_model(BaseModelConfig(source=str(tmp_path / "absent")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelFolderError, match="not a diffusers model folder"):
        load_base_model(BaseModelConfig(source=str(tmp_path / "empty")))

    broken = tmp_path / "broken"
    shutil.copytree(tiny_models("sdxl"), broken)
    shutil.rmtree(broken / "text_encoder_2")
    with pytest.raises(ModelFolderError, match=r"broken has no text_encoder_2/"):
        load_base_model(BaseModelConfig(source=str(broken)))

    (broken / "unet" / "config.json").write_text("{ not json")
    with pytest.raises(ModelFolderError, match=r"UNet2DConditionModel from .*broken/unet"):
        load_base_model(BaseModelConfig(source=str(broken)))

    weights = tmp_path / "no-weights"
    shutil.copytree(tiny_models("sd15"), weights)
    for f in (weights / "vae").glob("*.safetensors"):
        f.unlink()
    with pytest.raises(ModelFolderError, match=r"AutoencoderKL from .*no-weights/vae"):
        load_base_model(BaseModelConfig(source=str(weights)))
