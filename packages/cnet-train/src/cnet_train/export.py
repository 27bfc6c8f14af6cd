"""`cnet-train export CKPT OUT`: a training checkpoint to diffusers ControlNet folder(s).

Reads a Lightning checkpoint file (single device or DDP), a DeepSpeed checkpoint folder
(consolidated from its ZeRO shards first) or an FSDP2 distributed-checkpoint folder, and writes
`OUT/controlnet/` and, when the run kept an EMA, `OUT/controlnet_ema/`.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch

from cnet_models.atomic import replace_dir_atomically
from cnet_models.ema import ExponentialMovingAverage
from cnet_models.ema_export import export_ema_controlnet
from cnet_models.facade import ControlNetModel, checked

CONTROLNET_CONFIG_KEY = "cnet_controlnet_config"
EMA_STATE_KEY = "EMACallback"


def load_checkpoint(path: Path) -> dict[str, Any]:
    """The checkpoint as one dict (tensors on CPU), whatever layout it was saved in."""
    if path.is_dir():
        return _load_folder(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    return checked(state, dict, f"checkpoint {path}")


def _load_folder(path: Path) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        single = Path(tmp) / "consolidated.pt"
        if (path / "latest").exists() or any(path.glob("checkpoint/*optim_states.pt")):
            from lightning.pytorch.utilities.deepspeed import (
                convert_zero_checkpoint_to_fp32_state_dict,
            )

            convert_zero_checkpoint_to_fp32_state_dict(str(path), str(single))
        else:
            from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

            dcp_to_torch_save(str(path), str(single))
        state = torch.load(single, map_location="cpu", weights_only=True)
    return checked(state, dict, f"checkpoint folder {path}")


def export_checkpoint(checkpoint: Path, out: Path) -> list[Path]:
    """Write the ControlNet (and EMA) of `checkpoint` under `out`; return the folders."""
    state = load_checkpoint(Path(checkpoint))
    config = state.get(CONTROLNET_CONFIG_KEY)
    if not isinstance(config, dict):
        raise ValueError(
            f"{checkpoint} holds no ControlNet config ({CONTROLNET_CONFIG_KEY}); "
            "is it a cnet-train checkpoint?"
        )
    controlnet = _controlnet(config, _controlnet_weights(state, checkpoint))
    written = [Path(out) / "controlnet"]
    replace_dir_atomically(
        written[0], lambda tmp: controlnet.save_pretrained(str(tmp), safe_serialization=True)
    )
    ema_state = state.get("callbacks", {}).get(EMA_STATE_KEY)
    if ema_state:
        ema = ExponentialMovingAverage(controlnet)
        ema.load_state_dict(ema_state)
        written.append(export_ema_controlnet(ema, controlnet, Path(out) / "controlnet_ema"))
    return written


def _controlnet_weights(state: dict[str, Any], source: Path) -> dict[str, torch.Tensor]:
    weights = state.get("state_dict", state.get("module", state))
    prefix = "controlnet."
    found = {k.removeprefix(prefix): v for k, v in weights.items() if k.startswith(prefix)}
    if not found:
        raise ValueError(f"{source} holds no ControlNet weights (no '{prefix}*' keys)")
    return found


def _controlnet(config: dict[str, Any], weights: dict[str, torch.Tensor]) -> ControlNetModel:
    controlnet: ControlNetModel = checked(
        ControlNetModel.from_config(config), ControlNetModel, "ControlNet from config"
    )
    missing, unexpected = controlnet.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"checkpoint weights do not fit the ControlNet: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
    return controlnet
