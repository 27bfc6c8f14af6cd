"""EMA of the trainable weights: decay schedule, update arithmetic, resume, export, sharding."""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType

import pytest
import torch
from torch import nn

from cnet_models.ema import EMAConfig, EMAStateError, ExponentialMovingAverage
from cnet_models.ema_export import export_ema_controlnet
from cnet_models.facade import ControlNetModel, checked

WORKER = Path(__file__).with_name("ema_worker.py")


def _load_worker() -> ModuleType:
    """The sharded test's worker, whose tiny ControlNet and weight drift the reference reuses."""
    spec = importlib.util.spec_from_file_location("ema_worker", WORKER)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


worker = _load_worker()
tiny_controlnet: Callable[[], ControlNetModel] = worker.tiny_controlnet
train: Callable[[nn.Module, ExponentialMovingAverage], None] = worker.train


class Vector(nn.Module):
    """One parameter vector, for hand computations."""

    def __init__(self, values: list[float], dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor(values, dtype=dtype))

    @torch.no_grad()
    def set(self, values: list[float]) -> None:
        self.w.copy_(torch.tensor(values))


def two_layers(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3), nn.Linear(3, 2))


@torch.no_grad()
def randomize(module: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in module.parameters():
        p.copy_(torch.randn(p.shape, generator=g))


FIXED = EMAConfig(decay=0.75, warmup=False)

# --- the decay schedule ----------------------------------------------------------------------


def test_warmup_decay_follows_the_inv_gamma_power_formula() -> None:
    config = EMAConfig(decay=0.999)
    assert config.decay_at(0) == config.decay_at(1) == 0.0
    # t = step - 1; 1 - (1 + t) ** (-2/3), worked out separately.
    assert config.decay_at(2) == pytest.approx(0.3700394751, abs=1e-9)
    assert config.decay_at(10) == pytest.approx(0.7845565310, abs=1e-9)
    assert config.decay_at(10**7) == 0.999  # the ramp would exceed the maximum
    slow = EMAConfig(decay=0.999, inv_gamma=4.0, power=0.75)
    assert slow.decay_at(5) == pytest.approx(1 - 2.0**-0.75)  # t = 4, 1 + t / 4 = 2


def test_update_after_step_delays_the_start_and_min_decay_floors_it() -> None:
    late = EMAConfig(update_after_step=5)
    assert [late.decay_at(s) for s in range(7)] == [0.0] * 7
    assert late.decay_at(7) == EMAConfig().decay_at(2) > 0
    floored = EMAConfig(min_decay=0.5)
    assert floored.decay_at(1) == 0.0  # the first update still copies the weights
    assert floored.decay_at(2) == 0.5


def test_without_warmup_the_decay_is_fixed_once_started() -> None:
    assert [FIXED.decay_at(s) for s in (1, 2, 3, 1000)] == [0.0, 0.75, 0.75, 0.75]


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"decay": 1.5}, "decay"),
        ({"min_decay": 0.9, "decay": 0.8}, "min_decay"),
        ({"every_n_steps": 0}, "every_n_steps"),
        ({"inv_gamma": 0.0}, "inv_gamma"),
        ({"device": "cuda"}, "device"),
    ],
)
def test_bad_config_is_refused_naming_the_field(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        EMAConfig(**kwargs)  # type: ignore[arg-type]


# --- update arithmetic ---------------------------------------------------------------------


def test_update_matches_a_hand_computation() -> None:
    module = Vector([1.0, -2.0])
    ema = ExponentialMovingAverage(module, FIXED)
    module.set([3.0, 0.0])
    assert ema.update(module, 1)
    assert ema.shadow()["w"].tolist() == [3.0, 0.0]  # decay 0 at step 1: a copy
    module.set([-1.0, 4.0])
    ema.update(module, 2)
    assert ema.shadow()["w"].tolist() == [2.0, 1.0]  # 0.75 * old + 0.25 * new
    module.set([2.0, 5.0])
    ema.update(module, 3)
    assert ema.shadow()["w"].tolist() == [2.0, 2.0]
    assert ema.last_decay == 0.75 and ema.step == 3


def test_warmup_update_uses_the_decay_of_its_step() -> None:
    module = Vector([0.0])
    ema = ExponentialMovingAverage(module, EMAConfig())
    ema.update(module, 1)
    module.set([1.0])
    ema.update(module, 2)
    d = 1 - 2 ** (-2 / 3)
    assert ema.shadow()["w"].item() == pytest.approx(1 - d, rel=1e-6)


def test_bfloat16_weights_are_averaged_in_float32() -> None:
    module = Vector([1.0], dtype=torch.bfloat16)
    ema = ExponentialMovingAverage(module, FIXED)
    module.set([1.0078125])  # the next bfloat16 after 1
    ema.update(module, 1)
    module.set([1.0])
    ema.update(module, 2)
    shadow = ema.shadow()["w"]
    assert shadow.dtype == torch.float32
    # 1.0078125 - 0.25 * 0.0078125: between two bfloat16 values, kept exactly in float32.
    assert shadow.item() == 1.005859375
    assert shadow.to(torch.bfloat16).item() != 1.005859375


def test_only_trainable_parameters_are_averaged() -> None:
    module = two_layers(0)
    module[0].requires_grad_(False)
    ema = ExponentialMovingAverage(module, FIXED)
    assert ema.names == ("1.weight", "1.bias", "2.weight", "2.bias")
    module[0].requires_grad_(True)
    with pytest.raises(EMAStateError, match=r"'0\.weight' is trainable but not averaged"):
        ema.update(module, 1)
    with pytest.raises(EMAStateError, match=r"no parameter '1\.weight'"):
        ema.update(nn.Sequential(nn.Linear(4, 3)), 1)


def test_a_module_without_trainable_parameters_is_refused() -> None:
    with pytest.raises(EMAStateError, match="without trainable"):
        ExponentialMovingAverage(two_layers(0).requires_grad_(False))


# --- every_n_steps and update_after_step ---------------------------------------------------


def test_every_n_steps_skips_and_then_compounds_the_skipped_decays() -> None:
    config = EMAConfig(decay=0.9, every_n_steps=2)
    module = Vector([0.0])
    ema = ExponentialMovingAverage(module, config)
    module.set([8.0])
    assert not ema.update(module, 1)
    assert ema.shadow()["w"].item() == 0.0 and ema.step == 0
    assert ema.update(module, 2)
    assert ema.shadow()["w"].item() == 8.0  # step 1's decay is 0, so the product is too
    module.set([4.0])
    assert not ema.update(module, 3)
    assert ema.update(module, 4)
    decay = config.decay_at(3) * config.decay_at(4)
    assert ema.last_decay == decay
    assert ema.shadow()["w"].item() == pytest.approx(8.0 * decay + 4.0 * (1 - decay), rel=1e-6)


def test_every_n_steps_equals_every_step_when_weights_hold_between_updates() -> None:
    # The horizon in optimiser steps does not change with N: with the weights constant between
    # updates, updating every 3 steps gives what updating at every step gives.
    every, sparse = EMAConfig(decay=0.8), EMAConfig(decay=0.8, every_n_steps=3)
    module = Vector([0.0, 0.0])
    a, b = ExponentialMovingAverage(module, every), ExponentialMovingAverage(module, sparse)
    for block in range(4):
        module.set([float(block + 1), -2.0 * block])
        for step in range(3 * block + 1, 3 * block + 4):
            a.update(module, step)
            b.update(module, step)
    torch.testing.assert_close(a.shadow()["w"], b.shadow()["w"], rtol=1e-6, atol=1e-6)


def test_a_step_is_taken_in_once_and_steps_do_not_go_back() -> None:
    module = Vector([0.0])
    ema = ExponentialMovingAverage(module, FIXED)
    ema.update(module, 1)
    module.set([4.0])
    assert ema.update(module, 2)
    before = ema.shadow()["w"].clone()
    assert not ema.update(module, 2)  # e.g. called once per micro-batch
    assert torch.equal(ema.shadow()["w"], before)
    with pytest.raises(EMAStateError, match="step 1, but it is at step 2"):
        ema.update(module, 1)


def test_before_update_after_step_the_shadow_follows_the_weights() -> None:
    module = Vector([0.0])
    ema = ExponentialMovingAverage(module, EMAConfig(decay=0.5, warmup=False, update_after_step=3))
    for step in range(1, 5):
        module.set([float(step)])
        ema.update(module, step)
        assert ema.shadow()["w"].item() == float(step)
    module.set([0.0])
    ema.update(module, 5)
    assert ema.shadow()["w"].item() == 2.0


# --- placement -------------------------------------------------------------------------------


def test_cpu_placement_keeps_the_shadow_on_the_cpu_and_updates_it() -> None:
    module = two_layers(0)
    on_cpu = ExponentialMovingAverage(module, EMAConfig(decay=0.75, warmup=False, device="cpu"))
    same = ExponentialMovingAverage(module, FIXED)
    for step in range(1, 4):
        randomize(module, step)
        on_cpu.update(module, step)
        same.update(module, step)
    for name, tensor in on_cpu.shadow().items():
        assert tensor.device.type == "cpu" and tensor.dtype == torch.float32
        assert torch.equal(tensor, same.shadow()[name])
    assert not torch.equal(on_cpu.shadow()["0.weight"], module.get_parameter("0.weight"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bfloat16_weights_with_a_cpu_or_device_shadow() -> None:
    module = two_layers(0).to("cuda", torch.bfloat16)
    on_cpu = ExponentialMovingAverage(module, EMAConfig(decay=0.75, warmup=False, device="cpu"))
    same = ExponentialMovingAverage(module, FIXED)
    for step in range(1, 5):
        randomize(module, step)
        on_cpu.update(module, step)
        same.update(module, step)
    for name, tensor in on_cpu.shadow().items():
        assert tensor.device.type == "cpu"
        assert same.shadow()[name].device.type == "cuda"
        assert same.shadow()[name].dtype == torch.float32
        torch.testing.assert_close(tensor, same.shadow()[name].cpu(), rtol=1e-6, atol=1e-6)


# --- resume ----------------------------------------------------------------------------------


def test_state_dict_round_trip_continues_bitwise_like_an_uninterrupted_ema(
    tmp_path: Path,
) -> None:
    config = EMAConfig(decay=0.95, every_n_steps=2)
    module = two_layers(0)
    uninterrupted = ExponentialMovingAverage(module, config)
    for step in range(1, 6):
        randomize(module, step)
        uninterrupted.update(module, step)
    torch.save(uninterrupted.state_dict(), tmp_path / "ema.pt")
    resumed = ExponentialMovingAverage(two_layers(1), config)
    resumed.load_state_dict(torch.load(tmp_path / "ema.pt", weights_only=True))
    assert resumed.step == 4  # step 5 was skipped, and its decay is still owed
    for step in range(6, 12):
        randomize(module, step)
        uninterrupted.update(module, step)
        resumed.update(module, step)
    assert resumed.step == uninterrupted.step == 10
    for name, tensor in uninterrupted.shadow().items():
        assert torch.equal(resumed.shadow()[name], tensor), name


def _renamed(state: dict[str, object]) -> None:
    shadow = state["shadow"]
    assert isinstance(shadow, dict)
    shadow["0.weights"] = shadow.pop("0.weight")


def _reshaped(state: dict[str, object]) -> None:
    shadow = state["shadow"]
    assert isinstance(shadow, dict)
    shadow["2.bias"] = torch.zeros(5)


def _poisoned(state: dict[str, object]) -> None:
    shadow = state["shadow"]
    assert isinstance(shadow, dict)
    shadow["2.bias"] = torch.full((2,), float("nan"))


def _old_format(state: dict[str, object]) -> None:
    state["format"] = 0


@pytest.mark.parametrize(
    ("spoil", "message"),
    [
        (_renamed, r"missing \['0\.weight'\], unexpected \['0\.weights'\]"),
        (_reshaped, r"parameter '2\.bias' has shape \(5,\), the model's is \(2,\)"),
        (_poisoned, r"'2\.bias' holds inf or NaN"),
        (_old_format, "format 0"),
    ],
)
def test_loading_a_state_that_does_not_fit_fails_naming_it_and_changes_nothing(
    spoil: Callable[[dict[str, object]], None], message: str
) -> None:
    module = two_layers(0)
    state = ExponentialMovingAverage(module, FIXED).state_dict()
    spoil(state)
    randomize(module, 1)
    target = ExponentialMovingAverage(module, FIXED)
    before = {k: v.clone() for k, v in target.shadow().items()}
    with pytest.raises(EMAStateError, match=message):
        target.load_state_dict(state)
    assert all(torch.equal(before[k], v) for k, v in target.shadow().items())


def test_loading_a_state_saved_with_another_config_warns_and_keeps_the_current_one() -> None:
    module = two_layers(0)
    state = ExponentialMovingAverage(module, EMAConfig(decay=0.9)).state_dict()
    ema = ExponentialMovingAverage(module, EMAConfig(decay=0.99))
    with pytest.warns(UserWarning, match="continuing with"):
        ema.load_state_dict(state)
    assert ema.config.decay == 0.99


# --- copy_to, store, restore ---------------------------------------------------------------


def test_copy_to_casts_the_shadow_into_the_modules_weights() -> None:
    module = two_layers(0)
    ema = ExponentialMovingAverage(module, FIXED)
    randomize(module, 1)
    target = two_layers(2).to(torch.bfloat16)
    ema.copy_to(target)
    for name, tensor in ema.shadow().items():
        got = target.get_parameter(name)
        assert got.dtype == torch.bfloat16
        assert torch.equal(got, tensor.to(torch.bfloat16))


def test_averaged_swaps_the_ema_weights_in_and_the_live_ones_back() -> None:
    module = two_layers(0)
    ema = ExponentialMovingAverage(module, FIXED)
    randomize(module, 1)
    live = {k: v.clone() for k, v in module.state_dict().items()}

    def validate() -> None:
        with ema.averaged(module):
            for name, tensor in ema.shadow().items():
                assert torch.equal(module.get_parameter(name), tensor)
            raise RuntimeError("validation failed")

    with pytest.raises(RuntimeError, match="validation failed"):
        validate()
    assert all(torch.equal(live[k], v) for k, v in module.state_dict().items())
    ema.store(module)
    with pytest.raises(EMAStateError, match="twice"):
        ema.store(module)
    ema.restore(module)
    with pytest.raises(EMAStateError, match="without store"):
        ema.restore(module)


# --- export ----------------------------------------------------------------------------------


def trained_controlnet() -> tuple[ControlNetModel, ExponentialMovingAverage]:
    model = tiny_controlnet()
    ema = ExponentialMovingAverage(model, worker.CONFIG)
    train(model, ema)
    return model, ema


def load(folder: Path) -> dict[str, torch.Tensor]:
    loaded = checked(ControlNetModel.from_pretrained(folder), ControlNetModel, "exported EMA")
    state: dict[str, torch.Tensor] = loaded.state_dict()
    return state


def assert_is_export_of(
    exported: dict[str, torch.Tensor], model: nn.Module, ema: ExponentialMovingAverage
) -> None:
    live = model.state_dict()
    assert exported.keys() == live.keys()
    shadow = ema.shadow()
    for name, tensor in exported.items():
        expected = shadow.get(name, live[name])
        assert tensor.dtype == expected.dtype and torch.equal(tensor, expected), name


def test_export_loads_with_from_pretrained_and_holds_the_shadow(tmp_path: Path) -> None:
    model, ema = trained_controlnet()
    frozen = model.get_parameter(worker.FROZEN)
    assert worker.FROZEN not in ema.names
    before = {k: v.clone() for k, v in model.state_dict().items()}
    export_ema_controlnet(ema, model, tmp_path / "ema")
    exported = load(tmp_path / "ema")
    assert_is_export_of(exported, model, ema)
    assert torch.equal(exported[worker.FROZEN], frozen)  # frozen weights come from the model
    assert not torch.equal(exported["controlnet_mid_block.bias"], model.controlnet_mid_block.bias)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ema"]


def test_export_replaces_an_earlier_export(tmp_path: Path) -> None:
    model, ema = trained_controlnet()
    export_ema_controlnet(ema, model, tmp_path / "ema")
    randomize(model, 9)
    ema.update(model, ema.step + 2)
    export_ema_controlnet(ema, model, tmp_path / "ema")
    assert_is_export_of(load(tmp_path / "ema"), model, ema)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ema"]


def test_a_failed_export_leaves_the_earlier_one_intact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, ema = trained_controlnet()
    out = tmp_path / "ema"
    export_ema_controlnet(ema, model, out)
    files = {p.name: p.read_bytes() for p in out.iterdir()}

    def fail_midway(self: ControlNetModel, folder: Path, **_: object) -> None:
        (Path(folder) / "diffusion_pytorch_model.safetensors").write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(ControlNetModel, "save_pretrained", fail_midway)
    randomize(model, 9)
    ema.update(model, ema.step + 2)
    with pytest.raises(OSError, match="disk full"):
        export_ema_controlnet(ema, model, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == files
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ema"]


# --- sharded parameters (FSDP2 over gloo) --------------------------------------------------


@pytest.mark.distributed
def test_fsdp_sharded_ema_exports_what_one_unsharded_process_computes(
    tmp_path: Path, run_ranks: Callable[[Sequence[str], int], list[str]]
) -> None:
    run_ranks([str(WORKER), str(tmp_path)], 2)
    report = json.loads((tmp_path / "report.json").read_text())
    model, ema = trained_controlnet()
    total = sum(t.numel() for t in ema.shadow().values())
    assert report["sharded"] and sum(report["local_numels"]) == total
    assert all(0 < n < total for n in report["local_numels"])  # each rank held only a shard
    assert_is_export_of(load(tmp_path / "ema"), model, ema)
