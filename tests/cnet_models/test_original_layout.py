"""Single-file ControlNets in the original layout, judged by diffusers' own converter."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from cnet_models.facade import (
    ControlNetModel,
    checked,
    controlnet_from_unet,
    controlnet_weights_from_original,
    load_unet,
)
from cnet_models.families import registered_families
from cnet_models.fullsize import build_fullsize
from cnet_models.original_layout import PREFIX, original_names, save_single_file
from cnet_models.tiny import write_tiny_model

FAMILIES = [f.name for f in registered_families()]
# diffusers' ControlNet converter (0.42) has no rule for the SDXL added-condition embedding;
# these four weights are checked against the UNet's original names instead.
ADDED = {
    "add_embedding.linear_1.weight": "label_emb.0.0.weight",
    "add_embedding.linear_1.bias": "label_emb.0.0.bias",
    "add_embedding.linear_2.weight": "label_emb.0.2.weight",
    "add_embedding.linear_2.bias": "label_emb.0.2.bias",
}


def read_back(single_file: Path, config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """What diffusers makes of a single file: its converter, plus the SDXL embedding."""
    stored = load_file(str(single_file))
    converted = controlnet_weights_from_original(stored, config)
    for diffusers_key, original in ADDED.items():
        if PREFIX + original in stored:
            assert diffusers_key not in converted
            converted[diffusers_key] = stored[PREFIX + original]
    return converted


def _random_controlnet(family: str, folder: Path) -> ControlNetModel:
    write_tiny_model(family, folder / "model")
    controlnet = controlnet_from_unet(load_unet(folder / "model", "unet"))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # zero convolutions start at zero: make every weight tell apart
        for parameter in controlnet.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
    return controlnet


@pytest.mark.parametrize("family", FAMILIES)
def test_diffusers_reads_the_single_file_back_exactly(family: str, tmp_path: Path) -> None:
    controlnet = _random_controlnet(family, tmp_path)
    path = save_single_file(controlnet, tmp_path / "controlnet.safetensors")
    assert not list(tmp_path.glob(".*.partial"))
    expected = controlnet.state_dict()
    back = read_back(path, dict(controlnet.config))
    assert set(back) == set(expected)
    assert all(torch.equal(back[k], expected[k]) for k in expected)
    assert all(k.startswith(PREFIX) for k in load_file(str(path)))


def test_from_single_file_loads_it_and_computes_the_same(tmp_path: Path) -> None:
    controlnet = _random_controlnet("sd15", tmp_path).eval()
    controlnet.save_pretrained(str(tmp_path / "folder"))
    path = save_single_file(controlnet, tmp_path / "controlnet.safetensors")
    loaded = checked(
        ControlNetModel.from_single_file(
            str(path), config=str(tmp_path / "folder"), local_files_only=True
        ),
        ControlNetModel,
        "single-file ControlNet",
    ).eval()
    sample = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    hidden = torch.randn(1, 7, int(controlnet.config["cross_attention_dim"]))
    cond = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        a = controlnet(sample, 10, hidden, cond, return_dict=False)
        b = loaded(sample, 10, hidden, cond, return_dict=False)
    for x, y in zip([*a[0], a[1]], [*b[0], b[1]], strict=True):
        assert torch.equal(x, y)


def test_full_size_sd15_names_are_the_original_controlnets() -> None:
    controlnet = build_fullsize("sd15").controlnet  # on the meta device: names, no weights
    assert controlnet is not None
    names = set(original_names(controlnet).values())
    for known in (  # key names of the original SD 1.5 ControlNet checkpoints
        "control_model.time_embed.0.weight",
        "control_model.input_blocks.0.0.weight",
        "control_model.input_blocks.1.0.in_layers.0.weight",
        "control_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
        "control_model.input_blocks.3.0.op.weight",
        "control_model.input_blocks.4.0.skip_connection.weight",
        "control_model.input_blocks.11.0.out_layers.3.weight",
        "control_model.middle_block.1.proj_out.weight",
        "control_model.middle_block.2.emb_layers.1.weight",
        "control_model.middle_block_out.0.weight",
        "control_model.zero_convs.11.0.weight",
        "control_model.input_hint_block.0.weight",
        "control_model.input_hint_block.12.weight",
        "control_model.input_hint_block.14.weight",
    ):
        assert known in names, known
    assert not any("input_blocks.12" in n or "input_hint_block.16" in n for n in names)


def test_a_weight_the_layout_does_not_know_is_refused(tmp_path: Path) -> None:
    controlnet = _random_controlnet("sd15", tmp_path)
    controlnet.register_buffer("extra_thing", torch.zeros(1))
    with pytest.raises(ValueError, match="'extra_thing' has no place in the original layout"):
        save_single_file(controlnet, tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


def test_a_conditioning_embedding_loaders_do_not_know_is_refused(tmp_path: Path) -> None:
    write_tiny_model("sd15", tmp_path / "model")
    narrow = controlnet_from_unet(
        load_unet(tmp_path / "model", "unet"), conditioning_embedding_out_channels=(16, 32)
    )
    with pytest.raises(ValueError, match=r"\(16, 32\); the original layout has"):
        save_single_file(narrow, tmp_path / "x.safetensors")
    assert not list(tmp_path.glob("*.safetensors")) and not list(tmp_path.glob(".*partial"))
