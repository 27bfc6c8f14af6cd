"""An exported ControlNet (and its EMA twin) drives the diffusers ControlNet pipeline of its
family: the end-to-end promise of what cnet produces."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cnet_models.configs import BaseModelConfig, ControlNetConfig
from cnet_models.controlled import make_controlnet
from cnet_models.ema import EMAConfig, ExponentialMovingAverage
from cnet_models.ema_export import export_ema_controlnet
from cnet_models.facade import (
    ControlNetModel,
    StableDiffusionControlNetPipeline,
    StableDiffusionXLControlNetPipeline,
    load_controlnet,
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
    tiny_models: TinyModels, family: str, tmp_path: Path
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

    control = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8))
    pipeline_class = (
        StableDiffusionXLControlNetPipeline
        if model.family.added_conditioning
        else StableDiffusionControlNetPipeline
    )
    outputs = []
    for name in ("controlnet", "controlnet_ema"):
        loaded = load_controlnet(tmp_path / name, None)
        pipe = pipeline_class.from_pretrained(str(folder), controlnet=loaded)
        pipe.set_progress_bar_config(disable=True)  # type: ignore[no-untyped-call]
        result = pipe(
            "a red circle",
            image=control,
            num_inference_steps=2,
            height=64,
            width=64,
            output_type="np",
            generator=torch.Generator().manual_seed(0),
        )
        image = np.asarray(result.images[0])
        assert image.shape == (64, 64, 3)
        assert np.isfinite(image).all()
        outputs.append(image)
    assert not np.array_equal(outputs[0], outputs[1])  # the EMA weights are not the live ones
