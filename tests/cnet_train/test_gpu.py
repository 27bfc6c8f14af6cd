"""On one CUDA GPU, what the CPU matrix cannot show: each strategy's checkpoint, resume and
export on CUDA kernels, float16 mixed precision with its float32 VAE, Inductor across bucket
shapes, bitsandbytes' 8-bit AdamW, and the launch's memory plan against the real device.

All skip without CUDA; `benchmarks/gpu_check.sh` runs them on a GPU machine."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs
import lightning as L
import pytest
import torch
from typing_extensions import override

from cnet_models.facade import ControlNetModel
from cnet_train.callbacks.base import AfterBatch
from cnet_train.config import CheckpointConfig, TrainConfig, ValidationConfig
from cnet_train.memory_fix import with_overrides
from cnet_train.memory_launch import check_at_launch, device_memory
from cnet_train.memory_plan import Planner
from cnet_train.trainer import fit

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]
MakeConfig = Callable[..., TrainConfig]
QUIET: dict[str, Any] = {"enable_progress_bar": False}
STRATEGIES = {
    "auto": [],
    "deepspeed2": ["trainer.strategy=deepspeed", "trainer.deepspeed_stage=2"],
    "deepspeed3": ["trainer.strategy=deepspeed", "trainer.deepspeed_stage=3"],
    "fsdp": ["trainer.strategy=fsdp"],
}


def _on_gpu(config: TrainConfig, *overrides: str) -> TrainConfig:
    gpu = ["trainer.accelerator=gpu", "trainer.devices=1", "model.frozen_dtype=bfloat16"]
    return with_overrides(config, [*gpu, *overrides])


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_each_strategy_checkpoints_resumes_and_exports_on_one_gpu(
    strategy: str, make_config: MakeConfig
) -> None:
    if strategy.startswith("deepspeed"):
        pytest.importorskip("deepspeed")
    config = make_config(
        "sd15",
        steps=4,
        data_batch_size=2,
        validation=ValidationConfig(),
        checkpoint=CheckpointConfig(every_n_steps=2, keep_last=2, resume="auto"),
    )
    config = _on_gpu(config, *STRATEGIES[strategy])
    first, _ = fit(config, max_steps=2, **QUIET)
    assert first.global_step == 2
    resumed, module = fit(config, **QUIET)
    assert resumed.global_step == 4
    assert next(module.controlnet.parameters()).device.type == "cuda"
    export = config.run_dir / "exports" / "step-00000004"
    loaded = ControlNetModel.from_pretrained(export)
    assert all(torch.isfinite(p).all() for p in loaded.parameters())


def test_16_mixed_sdxl_trains_with_a_float32_vae(make_config: MakeConfig) -> None:
    config = _on_gpu(
        make_config("sdxl", steps=3, validation=ValidationConfig()),
        "trainer.precision=16-mixed",
        "model.frozen_dtype=float16",
    )
    trainer, module = fit(config, **QUIET)
    assert trainer.global_step == 3
    assert module.unet.dtype == torch.float16
    assert module.vae.dtype == torch.float32  # the tiny VAE's config says force_upcast
    assert torch.isfinite(torch.tensor(float(trainer.callback_metrics["train/loss"])))


def test_inductor_compiled_training_survives_bucket_changes(make_config: MakeConfig) -> None:
    config = _on_gpu(make_config("sd15", steps=6, validation=ValidationConfig()))
    config = with_overrides(config, ["trainer.compile=true"])
    shapes: list[tuple[int, ...]] = []

    class Shapes(AfterBatch):
        @override
        def after_batch(
            self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any
        ) -> None:
            shapes.append(tuple(batch["image"].shape))

    trainer, _ = fit(config, callbacks_extra=[Shapes()], **QUIET)
    assert trainer.global_step == 6
    assert len(set(shapes)) == 3
    assert torch.isfinite(torch.tensor(float(trainer.callback_metrics["train/loss"])))


def test_8bit_adamw_keeps_its_state_in_8_bits(make_config: MakeConfig) -> None:
    pytest.importorskip("bitsandbytes")
    config = _on_gpu(make_config("sd15", steps=3, validation=ValidationConfig()))
    config = with_overrides(config, ["optimizer.name=adamw8bit"])
    trainer, _ = fit(config, **QUIET)
    assert trainer.global_step == 3
    state = [v for s in trainer.optimizers[0].state.values() for v in s.values()]
    assert any(torch.is_tensor(v) and v.dtype == torch.uint8 for v in state)


def test_the_launch_plans_against_the_real_device(make_config: MakeConfig) -> None:
    config = _on_gpu(make_config("sd15"))
    memory = device_memory()
    assert memory is not None and memory > 2**30
    settled = check_at_launch(config)  # a tiny run fits any GPU: no checkpointing needed
    assert settled.controlnet.unet_gradient_checkpointing is False
    assert Planner().plan(settled).peak < memory
    trainer, _ = fit(config, **QUIET)  # and the launch itself goes through the same check
    assert trainer.global_step == config.trainer.max_steps


class EncoderPlaces(AfterBatch):
    """Where the text encoders sit during the training steps."""

    def __init__(self) -> None:
        self.devices: set[str] = set()

    @override
    def after_batch(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any
    ) -> None:
        for encoder in pl_module.base.text_encoders:  # type: ignore[union-attr]
            self.devices.add(next(encoder.parameters()).device.type)


def test_auto_precision_and_released_text_encoders_on_a_gpu(make_config: MakeConfig) -> None:
    from cnet_train.config import CacheConfig
    from cnet_train.embed import embed_captions

    config = make_config("sdxl", steps=2)  # the demo validates at the end
    gpu = ["trainer.accelerator=gpu", "trainer.devices=1"]
    config = with_overrides(config, [*gpu, "trainer.precision=auto", "model.frozen_dtype=auto"])
    config = attrs.evolve(config, cache=CacheConfig(path=config.run_dir.parent / "cache"))
    embed_captions(config)
    places = EncoderPlaces()
    trainer, module = fit(config, [places], **QUIET)
    assert trainer.global_step == 2
    expected = (
        "bf16-mixed" if torch.cuda.is_bf16_supported(including_emulation=False) else "16-mixed"
    )
    assert module.config.trainer.precision == expected
    assert module.unet.dtype != torch.float32
    assert places.devices == {"cpu"}  # released: the step reads the cache
    assert any((config.run_dir / "validation").glob("*.png"))  # rendered with them visiting
