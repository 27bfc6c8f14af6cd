"""With an embedding cache the text encoders stay off the training device and visit it only
to render validation images; the memory plan leaves them out accordingly.

This machine has one device, the CPU, so where a part sits cannot tell the two apart: the
tests record the moves the module asks for instead (the GPU check runs the real thing)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import attrs
import pytest
import torch

from cnet_models.arch_source import arch_configs, meta_networks
from cnet_models.loading import BaseModel, load_base_model
from cnet_models.pipelines import generate
from cnet_train.callbacks import validation
from cnet_train.config import CacheConfig, TrainConfig
from cnet_train.embed import embed_captions
from cnet_train.memory_plan import Planner
from cnet_train.trainer import fit

MakeConfig = Callable[..., TrainConfig]


def _cached(config: TrainConfig) -> TrainConfig:
    return attrs.evolve(config, cache=CacheConfig(path=config.run_dir.parent / "cache"))


def _moves(base: BaseModel, monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, str]]:
    """Records (encoder, device) for every `.to` of `base`'s text encoders."""
    moves: list[tuple[int, str]] = []
    for i, encoder in enumerate(base.text_encoders):
        original = encoder.to

        def record(*args: Any, _i: int = i, _to: Any = original, **kwargs: Any) -> Any:
            moves.append((_i, str(args[0] if args else kwargs.get("device"))))
            return _to(*args, **kwargs)

        monkeypatch.setattr(encoder, "to", record)
    return moves


def test_moving_the_base_model_can_leave_the_text_encoders_on_the_cpu(
    make_config: MakeConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = load_base_model(make_config("sdxl").model)
    moves = _moves(base, monkeypatch)
    device = torch.device("cpu", 0)  # stands for the training device
    base.to_device(device, text_encoders=False)
    assert moves == [(0, "cpu"), (1, "cpu")]
    moves.clear()
    with base.text_encoders_on(device):
        assert moves == [(0, "cpu:0"), (1, "cpu:0")]
    assert moves[2:] == [(0, "cpu"), (1, "cpu")]  # back where each was
    moves.clear()
    base.to_device(device)
    assert moves == [(0, "cpu:0"), (1, "cpu:0")]


@pytest.mark.slow
@pytest.mark.parametrize("cached", [True, False], ids=["cache", "no-cache"])
def test_a_run_keeps_its_text_encoders_on_the_device_only_without_a_cache(
    make_config: MakeConfig, monkeypatch: pytest.MonkeyPatch, cached: bool
) -> None:
    config = make_config("sdxl", steps=1)
    assert config.validation.prompts  # the demo renders at the end
    if cached:
        config = _cached(config)
        embed_captions(config)
    calls: list[str] = []
    to_device, text_encoders_on = BaseModel.to_device, BaseModel.text_encoders_on

    def spy_to_device(self: BaseModel, device: torch.device, **kwargs: Any) -> None:
        calls.append(f"to_device text_encoders={kwargs.get('text_encoders', True)}")
        to_device(self, device, **kwargs)

    @contextmanager
    def spy_on(self: BaseModel, device: torch.device) -> Iterator[None]:
        calls.append("encoders on")
        with text_encoders_on(self, device):
            yield
        calls.append("encoders back")

    def spy_generate(*args: Any, **kwargs: Any) -> Any:
        calls.append("render")
        return generate(*args, **kwargs)

    monkeypatch.setattr(BaseModel, "to_device", spy_to_device)
    monkeypatch.setattr(BaseModel, "text_encoders_on", spy_on)
    monkeypatch.setattr(validation, "generate", spy_generate)
    fit(config, enable_progress_bar=False)
    assert calls == [
        f"to_device text_encoders={not cached}",
        "encoders on",
        "render",
        "encoders back",
    ]


def test_the_plan_leaves_the_text_encoders_out_with_a_cache(make_config: MakeConfig) -> None:
    config = make_config("sdxl")
    nets = meta_networks(
        arch_configs(config.model, config.controlnet), config.model, config.controlnet
    )
    encoders = sum(
        sum(t.numel() * t.element_size() for t in (*e.parameters(), *e.buffers()))
        for e in nets.text_encoders
    )
    planner = Planner()
    without, with_cache = planner.plan(config), planner.plan(_cached(config))
    assert encoders > 0
    assert without.frozen - with_cache.frozen == encoders
