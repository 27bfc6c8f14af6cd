"""Training on CPU with tiny models: every family trains, the loss falls, the conditioning is
right, caption dropout is drawn per step, and the cache equals online encoding."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import lightning as L
import pytest
import torch
from typing_extensions import override

from cnet_data.batch import Batch
from cnet_data.captions import caption_key_hex
from cnet_data.embcache import CacheMismatchError
from cnet_data.sources import SourceConfig
from cnet_data.synthetic import write_fill_dataset
from cnet_models.facade import ControlNetModel
from cnet_train.callbacks.base import AfterBatch
from cnet_train.conditioning_config import ConditioningConfig
from cnet_train.config import CacheConfig, TrainConfig, ValidationConfig
from cnet_train.data import ControlNetDataModule
from cnet_train.embed import embed_captions
from cnet_train.module import ControlNetModule
from cnet_train.trainer import fit

MakeConfig = Callable[..., TrainConfig]
QUIET: dict[str, Any] = {"enable_progress_bar": False}


def _first_batch(config: TrainConfig) -> Batch:
    data = ControlNetDataModule(config)
    data.setup("fit")
    batch: Batch = next(iter(data.train_dataloader()))
    return batch


@pytest.mark.parametrize("family", ["sd15", "sd21", "sdxl"])
def test_each_family_trains_and_exports(make_config: MakeConfig, family: str) -> None:
    config = make_config(family, steps=3, validation=ValidationConfig())
    trainer, _ = fit(config, **QUIET)
    assert trainer.global_step == 3
    assert math.isfinite(float(trainer.callback_metrics["train/loss"]))
    export = config.run_dir / "exports" / "step-00000003"
    for name in ("controlnet", "controlnet_ema"):
        loaded = ControlNetModel.from_pretrained(str(export / name))
        assert isinstance(loaded, ControlNetModel)
    assert (config.run_dir / "config.yaml").is_file()
    assert (config.run_dir / "loss.png").is_file()


def test_loss_falls_on_a_fixed_batch(make_config: MakeConfig) -> None:
    config = make_config("sd15")
    module = ControlNetModule(config)
    batch = _first_batch(config)
    optimizer = torch.optim.AdamW(module.controlnet.parameters(), lr=1e-3)
    losses = []
    for _ in range(40):
        loss = module.loss(batch, step=7)  # the same noise and timesteps every time
        optimizer.zero_grad()
        torch.autograd.backward(loss)
        optimizer.step()
        losses.append(float(loss))
    assert losses[-1] < 0.5 * losses[0], losses[::8]


def test_sdxl_time_ids_follow_each_sample(make_config: MakeConfig, tmp_path: Path) -> None:
    # Squares of several sizes: one bucket, so each batch mixes original sizes and crops.
    sizes = [(64, 64), (80, 80), (96, 96), (72, 72)]
    manifest = write_fill_dataset(tmp_path / "mixed", 16, sizes=sizes)
    base = make_config("sdxl", data_batch_size=4)
    config = attrs.evolve(
        base,
        data=attrs.evolve(base.data, source=SourceConfig(manifest)),
        run_dir=tmp_path / "mixed-run",
    )
    module = ControlNetModule(config)
    data = ControlNetDataModule(config)
    data.setup("fit")
    for batch in data.train_dataloader():
        text = module.condition(batch, module.step_generator(0))
        added = module.added_conditioning(batch, text)
        assert added is not None
        expected = torch.cat(
            [batch["original_size"], batch["crop_top_left"], batch["target_size"]], dim=1
        ).float()
        assert torch.equal(added.time_ids, expected)
        if len({tuple(r) for r in added.time_ids.tolist()}) > 1:
            return  # rows differ where sizes or crops differ
    pytest.fail("no batch had samples with different sizes or crops")


def test_caption_dropout_is_drawn_at_every_step(make_config: MakeConfig) -> None:
    config = make_config("sd15", conditioning=ConditioningConfig(caption_dropout=0.5))
    module = ControlNetModule(config)
    batch = _first_batch(config)
    empty = module.prompt_encoder.empty_prompt().prompt_embeds[0]

    def dropped(step: int) -> tuple[bool, ...]:
        text = module.condition(batch, module.step_generator(step))
        return tuple(torch.allclose(e, empty) for e in text.prompt_embeds)

    patterns = {dropped(step) for step in range(12)}
    assert len(patterns) > 1
    assert dropped(3) == dropped(3)  # a pure function of the step


def test_cache_gives_the_same_loss_as_online_encoding(make_config: MakeConfig) -> None:
    online = make_config("sdxl", conditioning=ConditioningConfig(caption_dropout=0.3))
    cached = attrs.evolve(online, cache=CacheConfig(path=online.run_dir / "cache"))
    embed_captions(cached)
    batch = _first_batch(online)
    a, b = ControlNetModule(online), ControlNetModule(cached)
    b.load_state_dict(a.state_dict())  # the same (randomly initialised) ControlNet
    b.setup("fit")
    assert b.cache is not None
    assert caption_key_hex("") in b.cache
    for step in (0, 1, 2):
        # Equal up to float reordering: the cache encoded captions in other batches.
        torch.testing.assert_close(a.loss(batch, step), b.loss(batch, step), rtol=1e-5, atol=1e-6)


def test_half_precision_frozen_parts_train_and_validate(make_config: MakeConfig) -> None:
    config = make_config("sdxl", steps=2, trainer_precision="bf16-mixed")
    config = attrs.evolve(config, model=attrs.evolve(config.model, frozen_dtype="bfloat16"))
    trainer, module = fit(config, **QUIET)
    assert module.unet.dtype == torch.bfloat16
    assert module.controlnet.dtype == torch.float32  # trained in float32 under autocast
    assert trainer.global_step == 2
    assert (config.run_dir / "validation" / "step-00000002.png").is_file()


def test_a_cache_of_another_model_is_refused(make_config: MakeConfig) -> None:
    sd15 = make_config("sd15")
    cache = CacheConfig(path=sd15.run_dir / "cache")
    embed_captions(attrs.evolve(sd15, cache=cache))
    other = attrs.evolve(make_config("sd21"), cache=cache)
    with pytest.raises(CacheMismatchError, match="fingerprint differs"):
        ControlNetModule(other).setup("fit")


def test_compile_flag_compiles_in_place(make_config: MakeConfig) -> None:
    config = make_config("sd15", trainer_compile=True)
    module = ControlNetModule(config)
    names = list(module.controlnet.state_dict())
    module.configure_model()
    assert module.controlnet.mid_block._compiled_call_impl is not None
    assert module.unet.down_blocks[0]._compiled_call_impl is not None
    assert list(module.controlnet.state_dict()) == names  # checkpoints keep their keys


@pytest.mark.slow
def test_compiled_training_survives_bucket_changes(
    make_config: MakeConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Dynamo's guards, recompiles per bucket and the recompile limit are what this checks; on
    # CPU, Inductor's C++ code generation adds minutes per bucket shape and nothing to that, so
    # the blocks compile with the aot_eager backend here, through a counter of compiled frames.
    # benchmarks/gpu_check.sh runs the same training with Inductor on a GPU.
    from torch._dynamo.testing import CompileCounterWithBackend

    counter = CompileCounterWithBackend("aot_eager")
    module_compile = torch.nn.Module.compile

    def counted_compile(self: torch.nn.Module, *args: Any, **kwargs: Any) -> None:
        module_compile(self, *args, **{**kwargs, "backend": counter})

    monkeypatch.setattr(torch.nn.Module, "compile", counted_compile)
    config = make_config("sd15", steps=6, trainer_compile=True, validation=ValidationConfig())
    shapes: list[tuple[int, ...]] = []
    compiled: list[int] = []

    class Shapes(AfterBatch):
        @override
        def after_batch(
            self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any
        ) -> None:
            shapes.append(tuple(batch["image"].shape))
            compiled.append(counter.frame_count)

    trainer, _ = fit(config, callbacks_extra=[Shapes()], **QUIET)
    assert trainer.global_step == 6
    assert len(set(shapes)) == 3  # three bucket shapes, each met twice
    first_of_each = [i for i, shape in enumerate(shapes) if shape not in shapes[:i]]
    # every new shape compiles new graphs; a shape met again reuses its graphs (no eager
    # fallback at the recompile limit, no recompiles for a shape already seen)
    assert all(compiled[i] > (compiled[i - 1] if i else 0) for i in first_of_each)
    assert compiled[-1] == compiled[max(first_of_each)]
    assert math.isfinite(float(trainer.callback_metrics["train/loss"]))


def test_channels_last_trains_like_the_default_layout_and_exports(
    make_config: MakeConfig,
) -> None:
    base = make_config("sd15", steps=3, validation=ValidationConfig())
    straight = attrs.evolve(base, run_dir=base.run_dir.with_name("contiguous"))
    channels_last = attrs.evolve(
        base,
        run_dir=base.run_dir.with_name("channels-last"),
        trainer=attrs.evolve(base.trainer, channels_last=True),
    )

    class Losses(AfterBatch):
        def __init__(self) -> None:
            self.values: list[float] = []

        @override
        def after_batch(
            self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any
        ) -> None:
            self.values.append(float(outputs["loss"]))

    plain_losses, relaid_losses = Losses(), Losses()
    _, plain = fit(straight, callbacks_extra=[plain_losses], **QUIET)
    trainer, relaid = fit(channels_last, callbacks_extra=[relaid_losses], **QUIET)
    convs = [p for p in relaid.unet.parameters() if p.ndim == 4]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
    assert not all(p.is_contiguous() for p in convs)  # really re-laid, not 1x1 only
    # The same arithmetic in another memory order: equal up to the kernels' rounding (Adam's
    # normalised steps can turn a rounding difference in a tiny gradient into one of ~lr).
    torch.testing.assert_close(relaid_losses.values, plain_losses.values, rtol=1e-4, atol=1e-6)
    for name, weight in plain.controlnet.state_dict().items():
        torch.testing.assert_close(relaid.controlnet.state_dict()[name], weight, rtol=0, atol=1e-4)
    export = channels_last.run_dir / "exports" / f"step-{trainer.global_step:08d}" / "controlnet"
    loaded = ControlNetModel.from_pretrained(export)
    assert all(torch.isfinite(p).all() for p in loaded.parameters())
