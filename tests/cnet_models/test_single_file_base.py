"""A base model kept as one original-layout checkpoint (A1111 / ComfyUI style), loaded by
diffusers' own `from_single_file` with a diffusers folder's configs and tokenizers."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from cnet_models.configs import REFERENCE_MODELS, BaseModelConfig
from cnet_models.facade import ModelFolderError
from cnet_models.loading import load_base_model

TinyModels = Callable[[str], Path]
SingleFileOf = Callable[[Path, Path], Path]


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    left, right = a.state_dict(), b.state_dict()
    return left.keys() == right.keys() and all(torch.equal(left[k], right[k]) for k in left)


def test_a_single_file_loads_the_same_model_as_its_folder(
    tiny_models: TinyModels, single_file_of: SingleFileOf, tmp_path: Path
) -> None:
    folder = tiny_models("sd15")
    checkpoint = single_file_of(tiny_models("sd15"), tmp_path / "tiny.safetensors")
    config = BaseModelConfig(source=str(checkpoint), config=str(folder), local_files_only=True)
    assert config.single_file and config.described_by == str(folder)
    single = load_base_model(config)
    reference = load_base_model(BaseModelConfig(source=str(folder)))
    assert single.family.name == "sd15"  # from the checkpoint's keys
    for mine, theirs in zip(single.frozen_modules(), reference.frozen_modules(), strict=True):
        assert _same_weights(mine, theirs)
        assert not mine.training and not any(p.requires_grad for p in mine.parameters())
    assert single.scheduler.config == reference.scheduler.config
    prompt = ["a red square on a blue ground"]
    assert single.tokenizers[0](prompt).input_ids == reference.tokenizers[0](prompt).input_ids
    half = load_base_model(
        BaseModelConfig(source=str(checkpoint), config=str(folder), frozen_dtype="bfloat16")
    )
    assert half.unet.dtype == torch.bfloat16


def test_a_single_file_is_described_by_its_familys_reference_model_by_default(
    tiny_models: TinyModels, single_file_of: SingleFileOf, tmp_path: Path
) -> None:
    checkpoint = single_file_of(tiny_models("sd15"), tmp_path / "tiny.safetensors")
    assert BaseModelConfig(source=str(checkpoint)).described_by == REFERENCE_MODELS["sd15"]
    assert BaseModelConfig(source="x.safetensors", family="sdxl").described_by == (
        "stabilityai/stable-diffusion-xl-base-1.0"
    )


def test_single_files_cnet_cannot_trust_or_read_are_refused_by_name(tmp_path: Path) -> None:
    pickled = tmp_path / "model.ckpt"
    pickled.write_bytes(b"not read")
    with pytest.raises(ModelFolderError, match=r"\.ckpt checkpoint: cnet reads single files"):
        load_base_model(BaseModelConfig(source=str(pickled)))
    with pytest.raises(ModelFolderError, match="does not exist"):
        load_base_model(BaseModelConfig(source=str(tmp_path / "gone.safetensors")))
    unknown = tmp_path / "unknown.safetensors"
    save_file({"some.weight": torch.zeros(2)}, str(unknown))
    with pytest.raises(ModelFolderError, match=r"no SD 1\.5, SD 2\.1 or SDXL text encoder keys"):
        load_base_model(BaseModelConfig(source=str(unknown)))
