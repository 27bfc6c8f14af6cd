"""Throughput: FLOPs counted once per bucket shape on meta copies, and Lightning's samples/s,
FLOPs/s and MFU logged from them."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from cnet_train import flops
from cnet_train.callbacks import throughput
from cnet_train.config import TrainConfig
from cnet_train.data import ControlNetDataModule
from cnet_train.module import ControlNetModule
from cnet_train.trainer import fit

MakeConfig = Callable[..., TrainConfig]


def _area(batch: dict[str, Any]) -> int:
    height, width = batch["image"].shape[-2:]
    return int(height * width)


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_flops_are_counted_once_per_shape_and_scale_with_the_area(
    make_config: MakeConfig, family: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = make_config(family)
    module = ControlNetModule(config)
    data = ControlNetDataModule(config)
    data.setup("fit")
    counted: list[flops.ShapeKey] = []
    measure = flops.training_flops

    def counting(model: torch.nn.Module, args: flops.Args) -> int:
        counted.append(flops.shape_key("", args))
        return measure(model, args)

    monkeypatch.setattr(flops, "training_flops", counting)
    counter = flops.ForwardFlops({"controlnet": module.controlnet, "unet": module.unet})
    counter.watch()
    per_area: dict[int, set[int]] = {}
    for step, batch in zip(range(6), data.train_dataloader(), strict=False):  # 3 buckets, twice
        torch.autograd.backward(module.loss(batch, step))
        with torch.no_grad():
            module.loss(batch, step)  # a forward without grad (validation's) is not counted
        per_area.setdefault(_area(batch), set()).add(counter.take())
    counter.unwatch()
    assert len(counted) == len(set(counted)) == len(counter.counts) == 2 * 3  # 2 models, 3 shapes
    assert all(len(values) == 1 for values in per_area.values())  # the same shape, the same count
    (small, small_flops), *_, (large, large_flops) = sorted(
        (area, next(iter(values))) for area, values in per_area.items()
    )
    assert small < large and 0 < small_flops < large_flops
    # Convolutions dominate these models: FLOPs in proportion to the area.
    assert large_flops / small_flops == pytest.approx(large / small, rel=0.05)


def test_the_meta_copy_trains_what_the_real_model_trains(make_config: MakeConfig) -> None:
    module = ControlNetModule(make_config("sd15"))
    unet, controlnet = flops.meta_copy(module.unet), flops.meta_copy(module.controlnet)
    assert all(p.is_meta and not p.requires_grad for p in unet.parameters())
    assert all(p.is_meta and p.requires_grad for p in controlnet.parameters())
    assert sum(p.numel() for p in unet.parameters()) == sum(
        p.numel() for p in module.unet.parameters()
    )


def _logged(config: TrainConfig) -> dict[str, float]:
    trainer, _ = fit(config, enable_progress_bar=False)
    return {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/")}


def test_samples_per_second_and_mfu_where_the_peak_is_known(
    make_config: MakeConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    peak = 1e12
    monkeypatch.setattr(throughput, "get_available_flops", lambda device, dtype: peak)
    metrics = _logged(make_config("sd15", steps=4, trainer_log_every_n_steps=2))
    assert metrics["train/device/samples_per_sec"] > 0
    assert metrics["train/device/flops_per_sec"] > 0
    assert metrics["train/device/mfu"] == pytest.approx(
        metrics["train/device/flops_per_sec"] / peak
    )
    assert metrics["train/samples"] == 3 * 4  # the batches after the first, of 4 samples each


def test_no_mfu_where_the_peak_is_unknown(make_config: MakeConfig) -> None:
    # Lightning knows no peak for a CPU: the rates are logged, the utilisation is not.
    metrics = _logged(make_config("sd15", steps=4, trainer_log_every_n_steps=2))
    assert metrics["train/device/samples_per_sec"] > 0
    assert "train/device/mfu" not in metrics
