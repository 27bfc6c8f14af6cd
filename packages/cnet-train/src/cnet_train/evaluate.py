"""`cnet-train evaluate CONFIG WEIGHTS`: the control gain of any checkpoint or export.

WEIGHTS is one of:
- an export step folder (`RUN_DIR/exports/step-N/`): each ControlNet in it is measured,
  `controlnet` and, when the run kept an EMA, `controlnet_ema`;
- one ControlNet folder in diffusers format (`.../controlnet/`, `.../controlnet_ema/`, or any
  folder `ControlNetModel.from_pretrained` loads);
- a checkpoint of any strategy (a Lightning `.ckpt` file, a DeepSpeed or FSDP folder), read as
  `cnet-train export` reads it: its ControlNet and, with an EMA, the EMA twin.

The base model and the held-out set come from CONFIG (see `cnet_train.control_gain`): an export
of step N and the checkpoint of step N, measured with one config, report the same figures.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from cnet_data.errors import CnetError
from cnet_models.facade import ControlNetModel, load_component
from cnet_train.config import TrainConfig
from cnet_train.control_gain import (
    ControlGain,
    check_held_out_cached,
    format_table,
    held_out_batches,
    measure_control_gain,
)
from cnet_train.precision_auto import settle_here

EXPORT_NAMES = ("controlnet", "controlnet_ema")
"""The ControlNet folders of an export step folder, in report order."""


class WeightsNotFoundError(CnetError):
    """WEIGHTS is none of the things `cnet-train evaluate` reads."""


def load_weights(path: Path) -> dict[str, ControlNetModel]:
    """The ControlNet(s) at `path`, by name (`controlnet`, `controlnet_ema`, or the folder's
    own name for a single ControlNet folder)."""
    path = Path(path)
    if not path.exists():
        raise WeightsNotFoundError(
            f"weights {path} do not exist",
            hint="give an export folder (RUN_DIR/exports/step-N) or a checkpoint "
            "(RUN_DIR/checkpoints/step-N.ckpt)",
        )
    if path.is_dir() and (path / "config.json").is_file():
        return {path.name: _load_controlnet(path)}
    found = [name for name in EXPORT_NAMES if (path / name / "config.json").is_file()]
    if path.is_dir() and found:
        return {name: _load_controlnet(path / name) for name in found}
    from cnet_train.export import checkpoint_controlnets

    try:
        return checkpoint_controlnets(path)
    except (ValueError, OSError, KeyError) as exc:
        raise WeightsNotFoundError(
            f"weights {path} are neither a ControlNet folder, an export folder nor a "
            f"checkpoint cnet-train can read: {exc}",
            hint="give RUN_DIR/exports/step-N (or its controlnet/ folder) or "
            "RUN_DIR/checkpoints/step-N.ckpt",
        ) from exc


def _load_controlnet(folder: Path) -> ControlNetModel:
    controlnet: ControlNetModel = load_component(ControlNetModel, folder, None)
    return controlnet


def evaluate(config: TrainConfig, weights: Path) -> dict[str, ControlGain]:
    """The control gain of each ControlNet at `weights`, on `config`'s base model and held-out
    set, by name."""
    from cnet_train.module import ControlNetModule

    controlnets = load_weights(weights)
    config = settle_here(config)
    module = ControlNetModule(config)
    module.setup("validate")  # opens the embedding cache, if the config has one
    if module.cache is not None:
        check_held_out_cached(config, module.cache)
    device = _device(config)
    module.base.to_device(device, text_encoders=module.cache is None)
    batches = held_out_batches(config)
    settings = config.control_gain
    results = {}
    for name, controlnet in controlnets.items():
        module.controlnet = controlnet
        module.to(device)
        results[name] = measure_control_gain(
            module,
            batches,
            seed=config.validation.seed,
            repeats=settings.repeats,
            timestep_ranges=settings.timestep_ranges,
        )
    return results


def _device(config: TrainConfig) -> torch.device:
    accelerator = config.trainer.accelerator
    if accelerator == "gpu" or (accelerator == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def report(results: dict[str, ControlGain], weights: Path, *, as_json: bool = False) -> str:
    """What `cnet-train evaluate` prints: a table per ControlNet, or one JSON object."""
    if as_json:
        payload = {name: gain.as_dict() for name, gain in results.items()}
        return json.dumps({"weights": str(weights), "results": payload}, indent=2)
    return "\n\n".join(
        format_table(gain, title=f"{name} ({weights})") for name, gain in results.items()
    )
