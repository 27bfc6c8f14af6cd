"""A diffusers ControlNet's weights in the original ControlNet layout, as one `.safetensors`.

A1111, Forge and ComfyUI load ControlNets as single files with the key names of the original
ControlNet code (`control_model.input_blocks.1.0.in_layers.0.weight`, `zero_convs.0.0`,
`input_hint_block.0`, ...). This module renames a diffusers `ControlNetModel` state dict into
that layout; diffusers' own `ControlNetModel.from_single_file` reads it back (the tests use
it as the judge, so the mapping is checked by a converter cnet does not own).

The UNet half follows the original `input_blocks` numbering: block 0 is `conv_in`, then for
each down block its `layers_per_block` resnet (`.0`) and attention (`.1`) layers and, except
after the last block, the downsampler (`.0.op`). Every key is mapped or refused by name, so
a ControlNet variant this does not know fails loudly instead of losing weights.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from cnet_models.facade import ControlNetModel

PREFIX = "control_model."
"""What the original ControlNet checkpoints put before every key."""

_RESNET_NAMES = (
    ("norm1", "in_layers.0"),
    ("conv1", "in_layers.2"),
    ("norm2", "out_layers.0"),
    ("conv2", "out_layers.3"),
    ("time_emb_proj", "emb_layers.1"),
    ("conv_shortcut", "skip_connection"),
)
_FIXED = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "class_embedding.linear_1": "label_emb.0.0",
    "class_embedding.linear_2": "label_emb.0.2",
    "controlnet_cond_embedding.conv_in": "input_hint_block.0",
    "controlnet_mid_block": "middle_block_out.0",
    "mid_block.resnets.0": "middle_block.0",
    "mid_block.attentions.0": "middle_block.1",
    "mid_block.resnets.1": "middle_block.2",
}


def _resnet(rest: str) -> str:
    head, _, tail = rest.partition(".")
    renamed = dict(_RESNET_NAMES).get(head, head)
    return f"{renamed}.{tail}" if tail else renamed


ORIGINAL_HINT_CHANNELS = (16, 32, 96, 256)
"""The conditioning embedding of every original ControlNet: loaders assume its layout."""


def _renamer(config: Mapping[str, Any]) -> Callable[[str], str]:
    """The original name of each diffusers key, for a ControlNet built from `config`."""
    hint = tuple(config["conditioning_embedding_out_channels"])
    if hint != ORIGINAL_HINT_CHANNELS:
        # diffusers' converter, A1111 and ComfyUI place the hint block's output convolution
        # at index 14 and assume these widths; another embedding would load wrongly there.
        raise ValueError(
            f"the ControlNet's conditioning_embedding_out_channels are {hint}; the original "
            f"layout has {ORIGINAL_HINT_CHANNELS} only, so export it in the diffusers format"
        )
    per_block = int(config["layers_per_block"])
    hint_blocks = 2 * (len(config["conditioning_embedding_out_channels"]) - 1)
    rules: list[tuple[re.Pattern[str], Callable[[re.Match[str]], str]]] = [
        (
            re.compile(r"down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)"),
            lambda m: f"input_blocks.{_input_block(m, per_block)}.0.{_resnet(m[3])}",
        ),
        (
            re.compile(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.+)"),
            lambda m: f"input_blocks.{_input_block(m, per_block)}.1.{m[3]}",
        ),
        (
            re.compile(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)"),
            lambda m: f"input_blocks.{1 + (int(m[1]) + 1) * (per_block + 1) - 1}.0.op.{m[2]}",
        ),
        (
            re.compile(r"controlnet_down_blocks\.(\d+)\.(.+)"),
            lambda m: f"zero_convs.{m[1]}.0.{m[2]}",
        ),
        (
            re.compile(r"controlnet_cond_embedding\.blocks\.(\d+)\.(.+)"),
            lambda m: f"input_hint_block.{2 * (int(m[1]) + 1)}.{m[2]}",
        ),
        (
            re.compile(r"controlnet_cond_embedding\.conv_out\.(.+)"),
            lambda m: f"input_hint_block.{2 * (hint_blocks + 1)}.{m[1]}",
        ),
    ]

    def rename(key: str) -> str:
        for prefix, original in _FIXED.items():
            if key.startswith(prefix + "."):
                rest = key.removeprefix(prefix + ".")
                return f"{original}.{_resnet(rest) if '.resnets.' in prefix + '.' else rest}"
        for pattern, build in rules:
            found = pattern.fullmatch(key)
            if found:
                return build(found)
        raise ValueError(f"ControlNet weight {key!r} has no place in the original layout")

    return rename


def _input_block(found: re.Match[str], per_block: int) -> int:
    return 1 + int(found[1]) * (per_block + 1) + int(found[2])


def original_names(controlnet: ControlNetModel) -> dict[str, str]:
    """Each diffusers weight name of the ControlNet and its original name (with
    `control_model.`); reads names only, so it works on the meta device too."""
    rename = _renamer(controlnet.config)
    names: dict[str, str] = {}
    for key in controlnet.state_dict():
        name = PREFIX + rename(key)
        if name in names.values():
            raise ValueError(f"two ControlNet weights map to {name!r}")
        names[key] = name
    return names


def original_state_dict(controlnet: ControlNetModel) -> dict[str, torch.Tensor]:
    """The ControlNet's weights under their original names, contiguous and on the CPU, as
    safetensors stores them."""
    weights = controlnet.state_dict()
    return {
        name: weights[key].detach().to("cpu").contiguous()
        for key, name in original_names(controlnet).items()
    }


def save_single_file(controlnet: ControlNetModel, path: Path) -> Path:
    """Write the ControlNet as one `.safetensors` in the original layout, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staged = path.with_name(f".{path.name}.partial")
    try:
        save_file(original_state_dict(controlnet), str(staged), metadata={"format": "pt"})
        with open(staged, "rb") as fh:  # on disk before the rename makes it the file
            os.fsync(fh.fileno())
        staged.replace(path)
    finally:
        staged.unlink(missing_ok=True)
    return path
