"""A diffusers SD 1.x model folder written as one original-layout (LDM) checkpoint.

What a user downloads from Civitai or keeps in A1111's `models/Stable-diffusion/`: the UNet
under `model.diffusion_model.` (`input_blocks`, `middle_block`, `output_blocks`), the VAE under
`first_stage_model.` (attention projections as 1x1 convolutions), CLIP under
`cond_stage_model.transformer.`. For tests only; diffusers' `from_single_file` is the judge
(the tests check it reads these files back to the same weights).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
_VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _sub(rest: str, table: dict[str, str]) -> str:
    for old, new in table.items():
        if rest.startswith(old + "."):
            return new + rest[len(old) :]
    return rest


def unet_name(key: str, config: dict[str, Any]) -> str:
    per = int(config["layers_per_block"])
    fixed = {
        "time_embedding.linear_1": "time_embed.0",
        "time_embedding.linear_2": "time_embed.2",
        "conv_in": "input_blocks.0.0",
        "conv_norm_out": "out.0",
        "conv_out": "out.2",
        "add_embedding.linear_1": "label_emb.0.0",
        "add_embedding.linear_2": "label_emb.0.2",
    }
    for old, new in fixed.items():
        if key.startswith(old + "."):
            return new + key[len(old) :]
    m = re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d)\.(.+)", key)
    if m:
        index = {"resnets": {0: 0, 1: 2}, "attentions": {0: 1}}[m[1]][int(m[2])]
        rest = _sub(m[3], _RESNET) if m[1] == "resnets" else m[3]
        return f"middle_block.{index}.{rest}"
    m = re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key)
    if m:
        block = 1 + int(m[1]) * (per + 1) + int(m[3])
        rest = _sub(m[4], _RESNET) if m[2] == "resnets" else m[4]
        return f"input_blocks.{block}.{0 if m[2] == 'resnets' else 1}.{rest}"
    m = re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key)
    if m:
        return f"input_blocks.{(int(m[1]) + 1) * (per + 1)}.0.op.{m[2]}"
    m = re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key)
    if m:
        block = int(m[1]) * (per + 1) + int(m[3])
        rest = _sub(m[4], _RESNET) if m[2] == "resnets" else m[4]
        return f"output_blocks.{block}.{0 if m[2] == 'resnets' else 1}.{rest}"
    m = re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key)
    if m:
        i = int(m[1])
        has_attention = "CrossAttn" in config["up_block_types"][i]
        return f"output_blocks.{i * (per + 1) + per}.{2 if has_attention else 1}.conv.{m[2]}"
    raise ValueError(key)


def _vae_rules(blocks: int) -> list[tuple[str, Callable[[re.Match[str]], str]]]:
    def up(m: re.Match[str]) -> int:
        return blocks - 1 - int(m[1])  # the original numbers the decoder's blocks upwards

    return [
        (
            r"(encoder|decoder)\.mid_block\.resnets\.(\d)\.(.+)",
            lambda m: f"{m[1]}.mid.block_{int(m[2]) + 1}.{_sub(m[3], _VAE_RESNET)}",
        ),
        (
            r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)",
            lambda m: f"{m[1]}.mid.attn_1.{_sub(m[2], _VAE_ATTN)}",
        ),
        (
            r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)",
            lambda m: f"encoder.down.{m[1]}.block.{m[2]}.{_sub(m[3], _VAE_RESNET)}",
        ),
        (
            r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)",
            lambda m: f"encoder.down.{m[1]}.downsample.conv.{m[2]}",
        ),
        (
            r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)",
            lambda m: f"decoder.up.{up(m)}.block.{m[2]}.{_sub(m[3], _VAE_RESNET)}",
        ),
        (
            r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)",
            lambda m: f"decoder.up.{up(m)}.upsample.conv.{m[2]}",
        ),
        (r"(encoder|decoder)\.conv_norm_out\.(.+)", lambda m: f"{m[1]}.norm_out.{m[2]}"),
    ]


def vae_name(key: str, config: dict[str, Any]) -> str:
    for pattern, build in _vae_rules(len(config["block_out_channels"])):
        found = re.fullmatch(pattern, key)
        if found:
            return build(found)
    return key  # conv_in, conv_out, quant_conv, post_quant_conv keep their names


def write_ldm_checkpoint(folder: Path, path: Path) -> Path:
    """The SD 1.x model in diffusers folder `folder` as one `.safetensors` at `path`."""
    out: dict[str, torch.Tensor] = {}
    unet_config = json.loads((folder / "unet" / "config.json").read_text())
    for key, value in load_file(folder / "unet" / "diffusion_pytorch_model.safetensors").items():
        out["model.diffusion_model." + unet_name(key, unet_config)] = value
    vae_config = json.loads((folder / "vae" / "config.json").read_text())
    for key, value in load_file(folder / "vae" / "diffusion_pytorch_model.safetensors").items():
        # The original's attention projections are 1x1 convolutions.
        is_projection = ".mid.attn_1." in vae_name(key, vae_config) and value.ndim == 2
        weight = value[:, :, None, None] if is_projection else value
        out["first_stage_model." + vae_name(key, vae_config)] = weight
    for key, value in load_file(folder / "text_encoder" / "model.safetensors").items():
        named = key if key.startswith("text_model.") else "text_model." + key
        out["cond_stage_model.transformer." + named] = value
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in out.items()}, str(path))
    return path
