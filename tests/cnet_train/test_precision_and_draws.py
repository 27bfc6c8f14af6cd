"""Mixed precision leaves the frozen encoders alone; micro-batches draw their own randomness;
a launch whose other rank failed fails."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Sequence
from types import SimpleNamespace
from typing import Any, cast

import attrs
import pytest
import torch

from cnet_data.batch import Batch
from cnet_models.configs import DTypeName
from cnet_train.config import TrainConfig, ValidationConfig
from cnet_train.data import ControlNetDataModule
from cnet_train.module import ControlNetModule
from cnet_train.trainer import RankFailedError, check_local_ranks, fit

MakeConfig = Callable[..., TrainConfig]


def _first_batch(config: TrainConfig) -> Batch:
    data = ControlNetDataModule(config)
    data.setup("fit")
    batch: Batch = next(iter(data.train_dataloader()))
    return batch


def _record_output_dtypes(modules: Sequence[torch.nn.Module]) -> list[torch.dtype]:
    seen: list[torch.dtype] = []
    for module in modules:
        module.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
    return seen


@pytest.mark.parametrize("outer", [True, False], ids=["lightning-autocast", "deepspeed"])
@pytest.mark.parametrize(
    ("half", "frozen"), [(torch.float16, "float16"), (torch.bfloat16, "float32")]
)
def test_float32_vae_computes_in_float32_under_autocast(
    make_config: MakeConfig, half: torch.dtype, frozen: DTypeName, outer: bool
) -> None:
    precision = "16-mixed" if half == torch.float16 else "bf16-mixed"
    config = make_config("sdxl", trainer_precision=precision)
    config = attrs.evolve(config, model=attrs.evolve(config.model, frozen_dtype=frozen))
    module = ControlNetModule(config)
    # float16 frozen parts: the VAE stays float32 because its config says force_upcast.
    assert module.base.vae_force_upcast and module.vae.dtype == torch.float32
    vae_convs = [m for m in module.vae.modules() if isinstance(m, torch.nn.Conv2d)]
    controlnet_convs = [m for m in module.controlnet.modules() if isinstance(m, torch.nn.Conv2d)]
    vae_seen, controlnet_seen = (_record_output_dtypes(m) for m in (vae_convs, controlnet_convs))
    batch = _first_batch(config)
    # Lightning's mixed-precision plugin wraps the training step in autocast; under DeepSpeed
    # it does not (cnet hands it float32), and only the module's own autocast applies.
    with torch.autocast("cpu", dtype=half, enabled=outer):
        loss = module.loss(batch, step=0)
    assert torch.isfinite(loss)
    assert vae_seen and set(vae_seen) == {torch.float32}
    assert set(controlnet_seen) == {half}  # autocast is on where it belongs


def test_each_micro_batch_of_an_optimizer_step_draws_anew(
    make_config: MakeConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = make_config(  # 12 batches an epoch: accumulation never meets an epoch's end
        "sd15",
        steps=2,
        data_batch_size=1,
        trainer_accumulate_grad_batches=4,
        validation=ValidationConfig(),
    )
    drawn: list[tuple[int, int, torch.Tensor]] = []
    real = ControlNetModule.step_generator

    def recording(self: ControlNetModule, step: int, micro: int = 0) -> torch.Generator:
        first = torch.rand(4, generator=real(self, step, micro))
        drawn.append((step, micro, first))
        return real(self, step, micro)

    monkeypatch.setattr(ControlNetModule, "step_generator", recording)
    trainer, _ = fit(config, enable_progress_bar=False)
    assert trainer.global_step == 2
    assert [(s, m) for s, m, _ in drawn] == [(s, m) for s in range(2) for m in range(4)]
    firsts = [f for _, _, f in drawn]
    assert all(not torch.equal(a, b) for i, a in enumerate(firsts) for b in firsts[i + 1 :])


def _trainer_with_children(*codes: int) -> Any:
    procs = [subprocess.Popen([sys.executable, "-c", f"raise SystemExit({c})"]) for c in codes]
    return cast(
        Any, SimpleNamespace(strategy=SimpleNamespace(launcher=SimpleNamespace(procs=procs)))
    )


def test_a_failed_local_rank_fails_the_launch() -> None:
    check_local_ranks(_trainer_with_children(0, 0))  # all well: nothing raised
    with pytest.raises(RankFailedError, match="local rank 2 exited with code 3"):
        check_local_ranks(_trainer_with_children(0, 3))
