"""What to change when a run's plan does not fit the device, and the report of a plan.

The changes are tried in order of what they cost in speed, each on top of the ones before,
until the plan fits: gradient checkpointing of the frozen UNet (its blocks are recomputed in
the backward, about a tenth more FLOPs), of the ControlNet, the EMA's shadow in CPU memory,
8-bit AdamW (or, under DeepSpeed, ZeRO-3 over several devices and the optimizer in CPU
memory), FSDP over several devices, and last a smaller batch with gradient accumulation
(the same samples per optimizer step, at a lower throughput).
"""

from __future__ import annotations

import re
from collections.abc import Iterator

from cnet_train.config import TrainConfig
from cnet_train.config_io import config_from_dict, config_to_dict
from cnet_train.memory_plan import GiB, MemoryPlan, Planner


def with_overrides(config: TrainConfig, overrides: list[str]) -> TrainConfig:
    """`config` with `key=value` overrides applied, as `--set` applies them."""
    return config_from_dict(config_to_dict(config), overrides)


def _candidates(config: TrainConfig, world: int) -> Iterator[list[str]]:
    """Each next change to try, given the config with the earlier ones applied."""
    if config.controlnet.unet_gradient_checkpointing is not True:
        yield ["controlnet.unet_gradient_checkpointing=true"]
    if not config.controlnet.gradient_checkpointing:
        yield ["controlnet.gradient_checkpointing=true"]
    if config.ema.enabled and config.ema.config.device == "same":
        yield ["ema.config.device=cpu"]
    trainer = config.trainer
    if config.optimizer.name == "adamw" and trainer.strategy != "deepspeed":
        yield ["optimizer.name=adamw8bit"]
    if world > 1 and trainer.strategy in ("auto", "ddp"):
        yield ["trainer.strategy=fsdp"]
    if world > 1 and trainer.strategy == "deepspeed" and trainer.deepspeed_stage == 2:
        yield ["trainer.deepspeed_stage=3"]
    if trainer.strategy == "deepspeed" and not trainer.offload_optimizer:
        yield ["trainer.offload_optimizer=true"]
    batch, accumulate = config.data.batch_size, config.trainer.accumulate_grad_batches
    while batch > 1 and batch % 2 == 0:
        batch, accumulate = batch // 2, accumulate * 2
        yield [f"data.batch_size={batch}", f"trainer.accumulate_grad_batches={accumulate}"]


def changes_that_fit(
    config: TrainConfig, memory: int, world: int = 1, planner: Planner | None = None
) -> list[str] | None:
    """The overrides that make `config`'s plan fit `memory` bytes per device ([] when it fits
    as it is), or None when none of the changes is enough."""
    planner = planner or Planner()
    applied: list[str] = []
    current = config
    if planner.plan(current, world).peak <= memory:
        return applied
    for change in _candidates(config, world):
        applied = [*_without_keys(applied, change), *change]
        current = with_overrides(config, applied)
        if planner.plan(current, world).peak <= memory:
            return _needed(config, applied, memory, world, planner)
    return None


def _needed(
    config: TrainConfig, applied: list[str], memory: int, world: int, planner: Planner
) -> list[str]:
    """`applied` without the earlier changes that a later one made unnecessary (ZeRO offload
    may make 8-bit AdamW or the EMA's move pointless); the last change is always needed."""
    needed = list(applied)
    for item in applied[:-1]:
        if item.startswith(("data.batch_size=", "trainer.accumulate_grad_batches=")):
            continue
        trial = [other for other in needed if other != item]
        if planner.plan(with_overrides(config, trial), world).peak <= memory:
            needed = trial
    return needed


def _without_keys(applied: list[str], change: list[str]) -> list[str]:
    keys = {item.partition("=")[0] for item in change}
    return [item for item in applied if item.partition("=")[0] not in keys]


_SIZE = re.compile(r"\s*([0-9]*\.?[0-9]+)\s*(GiB|GB|MiB|MB|G|M)?\s*", re.IGNORECASE)
_UNITS = {"gib": GiB, "g": GiB, "gb": 10**9, "mib": 2**20, "m": 2**20, "mb": 10**6}


def parse_memory(text: str) -> int:
    """Bytes of a size such as `24GiB`, `80GB`, `141` (GiB when no unit is given)."""
    match = _SIZE.fullmatch(text)
    if match is None:
        raise ValueError(f"--memory {text!r} is not a size such as 24GiB, 80GB or 141")
    number, unit = float(match.group(1)), (match.group(2) or "gib").lower()
    return int(number * _UNITS[unit])


def report(plan: MemoryPlan, memory: int | None, world: int) -> str:
    """The plan as a table, and whether it fits `memory` bytes per device."""
    h, w = plan.bucket
    lines = [
        f"memory plan per device: batch {plan.batch} at {w}x{h} (the largest bucket), "
        f"{world} device{'s' if world > 1 else ''}; architectures from {plan.origin}",
    ]
    lines += [f"  {name:<24}{size / GiB:>9.2f} GiB" for name, size in plan.rows()]
    if memory is not None:
        verdict = "fits" if plan.peak <= memory else "does NOT fit"
        lines.append(f"  {verdict} in {memory / GiB:.2f} GiB")
    return "\n".join(lines)
