"""`auto` precision and frozen dtype: settled per machine, recorded, and shared by the caches."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import attrs
import pytest
import torch

from cnet_models.configs import BaseModelConfig
from cnet_train import precision_auto
from cnet_train.cli import main
from cnet_train.config import CacheConfig, TrainConfig, TrainerConfig
from cnet_train.config_io import dump_config, load_config
from cnet_train.embed import embed_captions
from cnet_train.memory_fix import with_overrides
from cnet_train.memory_plan import GiB, Planner
from cnet_train.module import ControlNetModule
from cnet_train.precision_auto import local_gpu, settle_precision
from cnet_train.trainer import fit

MakeConfig = Callable[..., TrainConfig]
AUTO = ["trainer.precision=auto", "model.frozen_dtype=auto"]


def _auto(make_config: MakeConfig, family: str = "sd15", **changes: object) -> TrainConfig:
    return with_overrides(make_config(family, **changes), AUTO)


def test_the_defaults_are_auto() -> None:
    assert TrainerConfig().precision == "auto"
    assert BaseModelConfig(source="some/model").frozen_dtype == "auto"


@pytest.mark.parametrize(
    ("gpu", "strategy", "precision", "frozen"),
    [
        (None, "auto", "32", "float32"),
        (None, "deepspeed", "32", "float32"),
        ("bf16", "ddp", "bf16-mixed", "bfloat16"),
        ("bf16", "deepspeed", "bf16-mixed", "bfloat16"),
        ("fp16", "ddp", "16-mixed", "float16"),
        ("fp16", "fsdp", "32", "float32"),  # no 16-mixed under FSDP2
        ("fp16", "deepspeed", "32", "float32"),  # nor under DeepSpeed
    ],
)
def test_auto_settles_per_accelerator(
    make_config: MakeConfig,
    gpu: precision_auto.GpuKind | None,
    strategy: str,
    precision: str,
    frozen: str,
) -> None:
    config = with_overrides(_auto(make_config), [f"trainer.strategy={strategy}"])
    settled = settle_precision(config, gpu)
    assert (settled.trainer.precision, settled.model.frozen_dtype) == (precision, frozen)


def test_explicit_settings_are_kept_and_frozen_auto_follows_an_explicit_precision(
    make_config: MakeConfig,
) -> None:
    explicit = make_config("sd15", trainer_precision="bf16-mixed")
    assert settle_precision(explicit, None) is explicit
    config = with_overrides(explicit, ["model.frozen_dtype=auto"])
    assert settle_precision(config, None).model.frozen_dtype == "bfloat16"
    config = with_overrides(make_config(), ["trainer.precision=auto"])  # frozen float32 given
    settled = settle_precision(config, "bf16")
    assert (settled.trainer.precision, settled.model.frozen_dtype) == ("bf16-mixed", "float32")


def test_a_base_model_in_memory_names_the_frozen_dtype(make_config: MakeConfig) -> None:
    settled = settle_precision(_auto(make_config), "bf16", frozen=torch.float32)
    assert (settled.trainer.precision, settled.model.frozen_dtype) == ("bf16-mixed", "float32")


def test_the_local_gpu_kind(make_config: MakeConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    trainer = make_config().trainer
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert local_gpu(trainer) is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    bf16: list[bool] = [True]
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation: bf16[0])
    assert local_gpu(attrs.evolve(trainer, accelerator="auto")) == "bf16"
    bf16[0] = False  # e.g. a V100 or a T4
    assert local_gpu(attrs.evolve(trainer, accelerator="gpu")) == "fp16"
    assert local_gpu(attrs.evolve(trainer, accelerator="cpu")) is None


def test_a_module_made_on_its_own_settles_for_this_machine(make_config: MakeConfig) -> None:
    module = ControlNetModule(_auto(make_config))
    assert (module.config.trainer.precision, module.config.model.frozen_dtype) == (
        "32",
        "float32",
    )
    assert module.unet.dtype == torch.float32
    square = torch.ones(4, 4)
    with module.autocast():  # 32: no autocast
        assert torch.mm(square, square).dtype == torch.float32


@pytest.mark.slow
def test_a_cpu_run_with_the_defaults_records_what_auto_became(make_config: MakeConfig) -> None:
    config = _auto(make_config, steps=1)
    config = attrs.evolve(config, cache=CacheConfig(path=config.run_dir.parent / "cache"))
    embed_captions(config)  # settled alike: the run opens the cache without a mismatch
    _, module = fit(config, enable_progress_bar=False)
    assert module.cache is not None
    written = load_config(config.run_dir / "config.yaml")
    assert (written.trainer.precision, written.model.frozen_dtype) == ("32", "float32")


def test_the_plan_of_auto_is_the_plan_of_a_bfloat16_gpu_run(
    make_config: MakeConfig,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    config = _auto(make_config, data_batch_size=4)
    path = tmp_path / "run.yaml"
    path.write_text(dump_config(config))
    assert main(["plan", str(path), "--memory", "80GiB", "--devices", "1"]) == 0
    out = capsys.readouterr().out
    assert "trainer.precision: auto -> bf16-mixed for a bfloat16 GPU" in out
    assert "model.frozen_dtype: auto -> bfloat16" in out
    bf16 = ["trainer.precision=bf16-mixed", "model.frozen_dtype=bfloat16"]
    expected = Planner().plan(with_overrides(config, bf16), 1).peak
    assert f"{expected / GiB:.2f} GiB" in out


def test_a_cache_of_another_dtype_is_refused_with_the_setting_that_reads_it(
    make_config: MakeConfig,
) -> None:
    from cnet_data.embcache import CacheMismatchError

    config = make_config("sd15")  # float32 frozen parts
    config = attrs.evolve(config, cache=CacheConfig(path=config.run_dir.parent / "cache"))
    embed_captions(config)
    half = with_overrides(config, ["trainer.precision=bf16-mixed", "model.frozen_dtype=auto"])
    module = ControlNetModule(half)
    with pytest.raises(CacheMismatchError, match=r"set model\.frozen_dtype to the cache's dtype"):
        module.setup("fit")


def test_a_resumed_run_keeps_the_dtypes_its_checkpoint_was_trained_in(
    make_config: MakeConfig,
) -> None:
    from cnet_train.config import CheckpointConfig
    from cnet_train.precision_auto import as_recorded

    half = ["trainer.precision=bf16-mixed", "model.frozen_dtype=bfloat16"]
    first = with_overrides(make_config("sd15", steps=1), half)
    first = attrs.evolve(first, checkpoint=CheckpointConfig(resume="auto"))
    fit(first, enable_progress_bar=False)
    (checkpoint,) = (first.run_dir / "checkpoints").glob("*.ckpt")
    relaunch = with_overrides(first, [*AUTO, "trainer.max_steps=2"])
    kept = as_recorded(relaunch, checkpoint)
    assert (kept.trainer.precision, kept.model.frozen_dtype) == ("bf16-mixed", "bfloat16")
    assert as_recorded(relaunch, None) is relaunch  # nothing to resume: the machine decides
    explicit = with_overrides(relaunch, ["trainer.precision=32", "model.frozen_dtype=float32"])
    assert as_recorded(explicit, checkpoint) is explicit  # an explicit setting wins
    _, module = fit(relaunch, enable_progress_bar=False)  # on this CPU, auto would say 32
    assert module.config.trainer.precision == "bf16-mixed"
    assert module.unet.dtype == torch.bfloat16
    (first.run_dir / "config.yaml").write_text("trainer: [not, a, mapping]\n")
    assert as_recorded(relaunch, checkpoint) is relaunch  # unreadable: nothing recorded
