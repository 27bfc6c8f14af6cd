"""The memory plan counts what a real run holds.

The exact parts (weights, gradients, optimizer state, EMA) are compared with a tiny run's real
tensors after one optimizer step and with full-size networks built on the meta device; the
activations, an estimate from a meta-device trace, with the tensors a real CPU step saves for
its backward at the largest bucket.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs
import lightning as L
import pytest
import torch
import torch.nn.functional as F
from typing_extensions import override

from cnet_models.configs import REFERENCE_MODELS
from cnet_models.controlled import ControlledUNet, make_controlnet
from cnet_models.fullsize import build_fullsize
from cnet_models.loading import load_base_model
from cnet_train.callbacks.ema import EMACallback
from cnet_train.config import TrainConfig
from cnet_train.memory_fix import changes_that_fit, parse_memory, with_overrides
from cnet_train.memory_plan import GiB, MemoryPlan, Planner, largest_bucket, plan_memory
from cnet_train.trainer import fit

MakeConfig = Callable[..., TrainConfig]


def _bytes(tensors: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class AfterFirstStep(L.Callback):
    """Counts the run's real tensors once the first optimizer step is done."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, *args: Any) -> None:
        if self.counts:
            return
        controlnet = pl_module.controlnet
        base = pl_module.base
        frozen = [base.unet, base.vae, *base.text_encoders]
        state = trainer.optimizers[0].state.values()
        ema = next(c for c in trainer.callbacks if isinstance(c, EMACallback)).ema  # type: ignore[attr-defined]
        assert ema is not None
        self.counts = {
            "frozen": sum(_bytes([*m.parameters(), *m.buffers()]) for m in frozen),
            "trainable": _bytes(controlnet.parameters()),
            "gradients": _bytes(p.grad for p in controlnet.parameters() if p.grad is not None),
            "optimizer": sum(_bytes(v for v in s.values() if torch.is_tensor(v)) for s in state),
            "ema": _bytes(ema.shadow().values()),
        }


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_static_bytes_equal_a_real_runs_tensors(make_config: MakeConfig, family: str) -> None:
    config = make_config(family, steps=1, samples=4)
    watch = AfterFirstStep()
    fit(config, [watch], enable_progress_bar=False)
    plan = plan_memory(config)
    counted = {k: getattr(plan, k) for k in watch.counts}
    assert counted == watch.counts
    assert min(counted.values()) > 0


@pytest.mark.parametrize("family", ["sd15", "sd21", "sdxl"])
def test_full_size_counts_equal_the_meta_networks(make_config: MakeConfig, family: str) -> None:
    """A hub id that is not on the machine is planned with the shipped full-size configs."""
    tiny = make_config(family)
    model = attrs.evolve(tiny.model, source=REFERENCE_MODELS[family], frozen_dtype="bfloat16")
    config = attrs.evolve(tiny, model=model)
    plan = plan_memory(config)
    nets = build_fullsize(family)
    assert nets.controlnet is not None
    n = sum(p.numel() for p in nets.controlnet.parameters())
    tensors = len(list(nets.controlnet.parameters()))
    assert "full-size" in plan.origin
    assert plan.trainable == plan.gradients == plan.ema == 4 * n
    assert plan.optimizer == 8 * n + 4 * tensors
    frozen = [nets.unet, nets.vae, *nets.text_encoders]
    weights = sum(sum(p.numel() for p in m.parameters()) for m in frozen)
    buffers = sum(_bytes(m.buffers()) for m in frozen)  # CLIP's int64 position ids
    assert plan.frozen == 2 * weights + buffers


def _saved_bytes_of_a_real_step(config: TrainConfig) -> int:
    """Bytes of the distinct storages a real float32 CPU step at the largest bucket saves for
    its backward (the weights, which the plan counts apart, left out)."""
    base = load_base_model(config.model)
    controlnet = make_controlnet(base.unet, config.controlnet)
    h, w = largest_bucket(config)
    b = config.data.batch_size
    with torch.no_grad():
        images = torch.randn(b, 3, h, w)
        latents = base.vae.encode(images).latent_dist.sample()
        embeds = base.prompt_encoder().encode(["a photo"] * b)
    weights = {
        p.untyped_storage().data_ptr()
        for m in (base.unet, controlnet)
        for p in [*m.parameters(), *m.buffers()]
    }
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    sizes = torch.tensor([[h, w]] * b)
    added = base.family.added_conditioning(embeds, sizes, torch.zeros_like(sizes), sizes)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        prediction = ControlledUNet(base.unet, controlnet)(
            latents,
            torch.full((b,), 500),
            embeds.prompt_embeds,
            torch.rand(b, 3, h, w),
            added=added,
        )
        loss = F.mse_loss(prediction.float(), torch.randn_like(prediction))
    torch.autograd.backward(loss)
    return sum(saved.values())


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_activation_estimate_is_within_a_quarter_of_a_real_step(
    make_config: MakeConfig, family: str
) -> None:
    config = make_config(family, data_batch_size=2)
    real = _saved_bytes_of_a_real_step(config)
    estimate = plan_memory(config).step.saved
    assert real > 0
    assert abs(estimate - real) <= 0.25 * real, (estimate, real)


def test_checkpointing_and_a_half_precision_shrink_the_activations(
    make_config: MakeConfig,
) -> None:
    """Per sample (two batch sizes apart): the tiny networks' weight copies (autocast's casts
    of the float32 ControlNet) are a large share of their small steps."""
    planner = Planner()

    def per_sample(*changes: str) -> float:
        config = with_overrides(make_config("sd15"), list(changes))
        two = planner.plan(with_overrides(config, ["data.batch_size=2"])).step.saved
        four = planner.plan(with_overrides(config, ["data.batch_size=4"])).step.saved
        assert four > two
        return (four - two) / 2

    plain = per_sample()
    both = ["controlnet.gradient_checkpointing=true", "controlnet.unet_gradient_checkpointing=true"]
    assert per_sample(*both) < 0.7 * plain
    assert per_sample("trainer.precision=bf16-mixed", "model.frozen_dtype=bfloat16") < 0.75 * plain


def _too_big(make_config: MakeConfig) -> tuple[TrainConfig, int, MemoryPlan]:
    config = make_config("sd15", data_batch_size=4)
    plan = plan_memory(config)
    # Room for the weights and a quarter of this step: no single change is enough.
    memory = plan.static + plan.margin + plan.step.saved // 4
    return config, memory, plan


def test_a_plan_that_does_not_fit_gets_changes_that_make_it_fit(
    make_config: MakeConfig,
) -> None:
    config, memory, plan = _too_big(make_config)
    assert plan.peak > memory
    planner = Planner()
    changes = changes_that_fit(config, memory, planner=planner)
    assert changes, "some change should fit"
    fixed = planner.plan(with_overrides(config, changes))
    assert fixed.peak <= memory
    # Nothing needless: without any one of the changes (but the batch pair) it does not fit.
    for item in changes:
        if item.startswith(("data.", "trainer.accumulate")):
            continue
        rest = [c for c in changes if c != item]
        assert planner.plan(with_overrides(config, rest)).peak > memory, item


def test_no_change_fits_a_device_smaller_than_the_weights(make_config: MakeConfig) -> None:
    config = make_config("sd15")
    assert changes_that_fit(config, plan_memory(config).frozen // 2) is None


def test_a_plan_that_fits_needs_no_change(make_config: MakeConfig) -> None:
    config = make_config("sd15")
    assert changes_that_fit(config, 80 * GiB) == []


@pytest.mark.parametrize(
    ("text", "expected"),
    [("24GiB", 24 * GiB), ("80GB", 80 * 10**9), ("141", 141 * GiB), ("512 MiB", 512 * 2**20)],
)
def test_memory_sizes_parse(text: str, expected: int) -> None:
    assert parse_memory(text) == expected


def test_a_bad_memory_size_names_itself() -> None:
    with pytest.raises(ValueError, match="'24 bananas'"):
        parse_memory("24 bananas")
