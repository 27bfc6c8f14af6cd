"""An exported ControlNet (and its EMA twin) drives the diffusers ControlNet pipeline of its
family: the end-to-end promise of what cnet produces."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from cnet_models.configs import BaseModelConfig, ControlNetConfig
from cnet_models.controlled import make_controlnet
from cnet_models.ema import EMAConfig, ExponentialMovingAverage
from cnet_models.ema_export import export_ema_controlnet
from cnet_models.facade import (
    ControlNetModel,
)
from cnet_models.families import FAMILY_NAMES
from cnet_models.loading import load_base_model

TinyModels = Callable[[str], Path]


def _nudge(controlnet: ControlNetModel, scale: float) -> None:
    with torch.no_grad():
        for p in controlnet.parameters():
            p.add_(torch.randn_like(p) * scale)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_exported_controlnet_and_ema_drive_the_pipeline(
    tiny_models: TinyModels,
    family: str,
    tmp_path: Path,
    render_with_controlnet: Callable[[Path, Path], np.ndarray],
) -> None:
    folder = tiny_models(family)
    model = load_base_model(BaseModelConfig(source=str(folder)))
    controlnet = make_controlnet(model.unet, ControlNetConfig())
    ema = ExponentialMovingAverage(controlnet, EMAConfig(decay=0.5, warmup=False))
    for step in range(1, 4):  # a stand-in for training: the weights move, the EMA follows
        _nudge(controlnet, 0.01)
        ema.update(controlnet, step)
    controlnet.save_pretrained(str(tmp_path / "controlnet"), safe_serialization=True)
    export_ema_controlnet(ema, controlnet, tmp_path / "controlnet_ema")

    outputs = [
        render_with_controlnet(folder, tmp_path / name) for name in ("controlnet", "controlnet_ema")
    ]
    assert not np.array_equal(outputs[0], outputs[1])  # the EMA weights are not the live ones
