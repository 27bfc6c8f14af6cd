"""`cnet-train export CKPT OUT`: a training checkpoint to diffusers ControlNet folder(s).

Reads a Lightning checkpoint file (single device or DDP), a DeepSpeed checkpoint folder
(consolidated from its ZeRO shards first) or an FSDP2 distributed-checkpoint folder, and writes
`OUT/controlnet/` and, when the run kept an EMA, `OUT/controlnet_ema/`. The EMA is read under
its stable key (`cnet.ema`), or under the class name older checkpoints stored it by.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch

from cnet_models.atomic import replace_dir_atomically
from cnet_models.ema import (
    PARTITION_KEY,
    EMAConfig,
    ExponentialMovingAverage,
    merge_partition_states,
)
from cnet_models.ema_export import export_ema_controlnet
from cnet_models.facade import ControlNetModel, checked
from cnet_models.original_layout import save_single_file
from cnet_train.state_keys import EMA_STATE_KEY, LEGACY_EMA_KEY, callback_state

CONTROLNET_CONFIG_KEY = "cnet_controlnet_config"
DCP_METADATA = "meta.pt"
"""The file Lightning writes beside a distributed checkpoint's shards: everything but the
module and optimizer state."""


def load_checkpoint(path: Path) -> dict[str, Any]:
    """The checkpoint as one dict (tensors on CPU), whatever layout it was saved in."""
    if path.is_dir():
        return _load_folder(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    return checked(state, dict, f"checkpoint {path}")


def _load_folder(path: Path) -> dict[str, Any]:
    if (path / "latest").exists() or any(path.glob("checkpoint/*optim_states.pt")):
        return _load_deepspeed(path)
    if (path / DCP_METADATA).is_file():
        return _load_dcp(path)
    raise ValueError(
        f"checkpoint folder {path} is neither a DeepSpeed checkpoint (no 'latest') nor a "
        f"distributed checkpoint (no {DCP_METADATA})"
    )


def _load_deepspeed(path: Path) -> dict[str, Any]:
    """The fp32 weights consolidated from the ZeRO partitions, with the client state (config,
    EMA). The module DeepSpeed trained holds only the ControlNet, so nothing frozen is read."""
    from lightning.pytorch.utilities.deepspeed import convert_zero_checkpoint_to_fp32_state_dict

    with tempfile.TemporaryDirectory() as tmp:
        single = Path(tmp) / "consolidated.pt"
        convert_zero_checkpoint_to_fp32_state_dict(str(path), str(single))
        state = checked(
            torch.load(single, map_location="cpu", weights_only=True),
            dict,
            f"checkpoint folder {path}",
        )
    ema = saved_ema_state(state)
    if isinstance(ema, dict) and PARTITION_KEY in ema:
        state["callbacks"][EMA_STATE_KEY] = _merged_ema(path, state)
    return state


def saved_ema_state(state: dict[str, Any]) -> Any:
    """The EMA state a checkpoint holds (under its stable key, or its older one), or None."""
    return callback_state(state, EMA_STATE_KEY, LEGACY_EMA_KEY)


def _merged_ema(path: Path, state: dict[str, Any]) -> dict[str, object]:
    """The full EMA of a ZeRO-3 checkpoint, whose every rank stored its own partitions."""
    files = sorted((path / "checkpoint").glob("zero_pp_rank_*_model_states.pt"))
    parts = [saved_ema_state(torch.load(f, map_location="cpu", weights_only=True)) for f in files]
    shapes = {
        k.removeprefix("controlnet."): v.shape
        for k, v in state["state_dict"].items()
        if k.startswith("controlnet.")
    }
    ema_names = set(parts[0]["shadow"])
    return merge_partition_states(parts, {k: s for k, s in shapes.items() if k in ema_names})


def _load_dcp(path: Path) -> dict[str, Any]:
    """Lightning's metadata file (config, EMA, loop state) and the module's weights read from
    the distributed checkpoint, in this one process; the optimizer state is not read."""
    from torch.distributed.checkpoint.filesystem import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata
    from torch.distributed.checkpoint.state_dict_loader import load

    state = checked(
        torch.load(path / DCP_METADATA, map_location="cpu", weights_only=True),
        dict,
        f"{path / DCP_METADATA}",
    )
    stored = FileSystemReader(str(path)).read_metadata().state_dict_metadata
    prefix = "state_dict."
    weights: dict[str, torch.Tensor] = {}
    for key, meta in stored.items():
        if key.startswith(prefix) and isinstance(meta, TensorStorageMetadata):
            weights[key.removeprefix(prefix)] = torch.empty(meta.size, dtype=meta.properties.dtype)
    target = {"state_dict": weights}
    load(target, checkpoint_id=str(path), no_dist=True)
    state["state_dict"] = target["state_dict"]
    return state


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
    ema_state = saved_ema_state(state)
    if ema_state:
        ema = _saved_ema(controlnet, ema_state)
        written.append(export_ema_controlnet(ema, controlnet, Path(out) / "controlnet_ema"))
    return written


def export_single_files(checkpoint: Path, out: Path) -> list[Path]:
    """Write the ControlNet (and EMA) of `checkpoint` as `out/controlnet.safetensors` (and
    `out/controlnet_ema.safetensors`) in the original ControlNet layout that A1111, Forge and
    ComfyUI load; return the files."""
    found = checkpoint_controlnets(checkpoint)
    return [save_single_file(net, Path(out) / f"{name}.safetensors") for name, net in found.items()]


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


def checkpoint_controlnets(checkpoint: Path) -> dict[str, ControlNetModel]:
    """The ControlNet of `checkpoint` in memory, as `controlnet` and, when the run kept an EMA,
    `controlnet_ema` (the names of the export folders): what `export_checkpoint` would write."""
    state = load_checkpoint(Path(checkpoint))
    config = state.get(CONTROLNET_CONFIG_KEY)
    if not isinstance(config, dict):
        raise ValueError(
            f"{checkpoint} holds no ControlNet config ({CONTROLNET_CONFIG_KEY}); "
            "is it a cnet-train checkpoint?"
        )
    controlnet = _controlnet(config, _controlnet_weights(state, checkpoint))
    found = {"controlnet": controlnet}
    ema_state = saved_ema_state(state)
    if ema_state:
        averaged = _controlnet(config, controlnet.state_dict())
        ema = _saved_ema(averaged, ema_state)
        ema.copy_to(averaged)
        found["controlnet_ema"] = averaged
    return found


def _saved_ema(module: ControlNetModel, state: dict[str, Any]) -> ExponentialMovingAverage:
    """The EMA of `state` over `module`, with the config it was trained with (recorded in the
    state): built with the default config, loading it would warn on every export that the
    configs differ, which is no concern of an export (it only reads the averaged weights)."""
    saved = state.get("config")
    try:
        config = EMAConfig(**saved) if isinstance(saved, dict) else None
    except (TypeError, ValueError):  # another version's fields: loading says how it differs
        config = None
    ema = ExponentialMovingAverage(module, config)
    ema.load_state_dict(state)
    return ema
