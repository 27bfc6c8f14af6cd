"""The EMA weights as their own diffusers ControlNet folder.

The folder is the live ControlNet's config and full state dict with every averaged parameter
replaced by its float32 shadow, gathered from all ranks when sharded; frozen parameters and
buffers come from the live model. Only rank 0 writes, into a temporary sibling folder that is
renamed into place once complete, so an existing export survives a failed one.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from cnet_models.atomic import replace_dir_atomically
from cnet_models.ema import EMAStateError, ExponentialMovingAverage, clean_name
from cnet_models.facade import ControlNetModel, checked
from cnet_models.gather import full_state_dict, full_tensor, is_writer

__all__ = ["averaged_state_dict", "export_controlnet", "export_ema_controlnet"]


def _canonical_names(module: nn.Module) -> dict[str, str]:
    """Every parameter name, tied aliases included, mapped to the name `named_parameters` gives
    that parameter first (the one the EMA knows it by)."""
    first: dict[int, str] = {}
    aliases: dict[str, str] = {}
    for name, param in module.named_parameters(remove_duplicate=False):
        aliases[clean_name(name)] = first.setdefault(id(param), clean_name(name))
    return aliases


@torch.no_grad()
def averaged_state_dict(
    ema: ExponentialMovingAverage, module: nn.Module
) -> dict[str, torch.Tensor]:
    """`module`'s full state dict on the CPU with the averaged parameters taken from `ema`.

    Collective when sharded (call on every rank): tensors are gathered one at a time, and only
    rank 0 keeps them; other ranks get `{}`.
    """
    shadow = ema.global_shadow()
    aliases = _canonical_names(module)
    keep = is_writer()
    out: dict[str, torch.Tensor] = {}
    for raw, live in module.state_dict(keep_vars=True).items():
        name = clean_name(raw)
        value = shadow.get(aliases.get(name, name), live)
        full = full_tensor(value)
        if keep:
            out[name] = full.detach().to("cpu", copy=True)
    unseen = set(ema.names) - {aliases.get(n, n) for n in out} if keep else set()
    if unseen:
        raise EMAStateError(f"module's state dict lacks averaged parameters {sorted(unseen)[:5]}")
    return out


def export_ema_controlnet(
    ema: ExponentialMovingAverage, controlnet: ControlNetModel, out_dir: str | Path
) -> Path:
    """Write the EMA of `controlnet` as a folder `ControlNetModel.from_pretrained` loads.

    Collective when sharded: call on every rank. Rank 0 writes and returns once the folder is in
    place; the other ranks return as soon as their part of the gather is done (barrier yourself
    if they must read it).
    """
    out = Path(out_dir)
    state = averaged_state_dict(ema, controlnet)
    if is_writer():
        _write(controlnet, state, out)
    return out


def export_controlnet(controlnet: ControlNetModel, out_dir: str | Path) -> Path:
    """Write `controlnet`'s own weights as a folder `ControlNetModel.from_pretrained` loads.

    Works on sharded ControlNets (FSDP2, ZeRO-3): the full tensors are gathered, one at a time,
    on every rank (call on every rank), and rank 0 writes them, atomically.
    """
    out = Path(out_dir)
    state = {clean_name(k): v for k, v in full_state_dict(controlnet).items()}
    if is_writer():
        _write(controlnet, state, out)
    return out


def _write(controlnet: ControlNetModel, state: dict[str, torch.Tensor], out: Path) -> None:
    with torch.device("meta"):  # no random init of weights that are overwritten anyway
        model = checked(
            ControlNetModel.from_config(controlnet.config), ControlNetModel, "ControlNet"
        )
    full32 = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    model.load_state_dict(full32, strict=True, assign=True)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise EMAStateError(f"ControlNet export left tensors without values: {left[:5]}")
    replace_dir_atomically(out, lambda tmp: _save(model, tmp))


def _save(model: ControlNetModel, folder: Path) -> None:
    model.save_pretrained(folder, safe_serialization=True)
    # diffusers writes the weights with mode 0600 (via a temporary file) but the config with the
    # umask's mode; an export is meant to be shared, so the weights get the config's mode.
    mode = (folder / "config.json").stat().st_mode & 0o777
    for path in folder.iterdir():
        path.chmod(mode)
