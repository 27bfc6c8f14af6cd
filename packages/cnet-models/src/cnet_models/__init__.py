"""cnet-models: model families, loading, the controlled UNet, text encoding, EMA, tiny models.

Nothing here imports lightning, and only `cnet_models.facade` imports diffusers and
transformers. Importing the package is cheap: the names below load their modules on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_EXPORTS = {
    "FAMILIES": "cnet_models.families",
    "Family": "cnet_models.families",
    "detect_family": "cnet_models.families",
    "BaseModel": "cnet_models.loading",
    "BaseModelConfig": "cnet_models.configs",
    "load_base_model": "cnet_models.loading",
    "AddedConditioning": "cnet_models.controlled",
    "ControlNetConfig": "cnet_models.configs",
    "ControlledUNet": "cnet_models.controlled",
    "make_controlnet": "cnet_models.controlled",
    "sdxl_time_ids": "cnet_models.controlled",
    "PromptEmbeddings": "cnet_models.text",
    "PromptEncoder": "cnet_models.text",
    "NoiseSchedule": "cnet_models.noise",
    "EMAConfig": "cnet_models.ema",
    "ExponentialMovingAverage": "cnet_models.ema",
    "export_ema_controlnet": "cnet_models.ema_export",
    "write_tiny_model": "cnet_models.tiny",
    "build_fullsize": "cnet_models.fullsize",
}

__all__ = [
    "FAMILIES",
    "AddedConditioning",
    "BaseModel",
    "BaseModelConfig",
    "ControlNetConfig",
    "ControlledUNet",
    "EMAConfig",
    "ExponentialMovingAverage",
    "Family",
    "NoiseSchedule",
    "PromptEmbeddings",
    "PromptEncoder",
    "__version__",
    "build_fullsize",
    "detect_family",
    "export_ema_controlnet",
    "load_base_model",
    "make_controlnet",
    "sdxl_time_ids",
    "write_tiny_model",
]

if TYPE_CHECKING:
    from cnet_models.configs import BaseModelConfig, ControlNetConfig
    from cnet_models.controlled import (
        AddedConditioning,
        ControlledUNet,
        make_controlnet,
        sdxl_time_ids,
    )
    from cnet_models.ema import EMAConfig, ExponentialMovingAverage
    from cnet_models.ema_export import export_ema_controlnet
    from cnet_models.families import FAMILIES, Family, detect_family
    from cnet_models.fullsize import build_fullsize
    from cnet_models.loading import BaseModel, load_base_model
    from cnet_models.noise import NoiseSchedule
    from cnet_models.text import PromptEmbeddings, PromptEncoder
    from cnet_models.tiny import write_tiny_model


def __getattr__(name: str) -> object:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'cnet_models' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
