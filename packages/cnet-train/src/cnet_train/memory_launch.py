"""The memory plan where a run meets a machine: `cnet-train plan`, and the check at launch."""

from __future__ import annotations

import logging

import attrs
import torch

from cnet_data.errors import CnetError
from cnet_train.config import TrainConfig
from cnet_train.memory_fix import changes_that_fit, parse_memory, report
from cnet_train.memory_plan import GiB, Planner
from cnet_train.precision_auto import GpuKind, local_gpu, settle_precision, settled_lines

logger = logging.getLogger(__name__)


class PlanDoesNotFitError(CnetError):
    """The run's memory plan exceeds the device's memory."""


def device_memory() -> int | None:
    """Total memory of this machine's first GPU; None without one."""
    if not torch.cuda.is_available():
        return None
    return int(torch.cuda.get_device_properties(0).total_memory)


def world_size(config: TrainConfig) -> int:
    """The devices the run spreads over, as far as the config and this machine tell."""
    devices = config.trainer.devices
    if devices == "auto":
        devices = torch.cuda.device_count() if config.trainer.accelerator != "cpu" else 1
    return max(1, devices) * config.trainer.num_nodes


def plan_command(config: TrainConfig, memory_text: str | None, devices: int | None) -> int:
    """Print the plan of `config` as a launch would settle it; 1 if it does not fit (and what
    would), else 0."""
    memory = parse_memory(memory_text) if memory_text is not None else device_memory()
    world = devices if devices is not None else world_size(config)
    planner = Planner()
    # The plan is of a GPU run: this machine's GPU, or (without one) a bfloat16 GPU.
    gpu = local_gpu(config.trainer)
    unsettled, config = config, settle_precision(config, gpu or "bf16")
    if memory is None:
        print(report(planner.plan(config, world), memory, world))
        _print_settled(unsettled, config, gpu)
        print("  no GPU here: give --memory (e.g. --memory 80GiB) to check a fit")
        return 0
    settled = settle_auto_checkpointing(config, memory, world, planner)
    plan = planner.plan(settled, world)
    print(report(plan, memory, world))
    _print_settled(unsettled, config, gpu)
    if (
        settled.controlnet.unet_gradient_checkpointing
        is not config.controlnet.unet_gradient_checkpointing
    ):
        print(f"  controlnet.unet_gradient_checkpointing: auto -> {_on_off(settled)} at launch")
    config = settled
    if plan.peak <= memory:
        return 0
    print(_advice(changes_that_fit(config, memory, world, planner)))
    return 1


def _print_settled(config: TrainConfig, settled: TrainConfig, gpu: GpuKind | None) -> None:
    where = "on this machine's GPU" if gpu else "for a bfloat16 GPU (none is in use here)"
    for line in settled_lines(config, settled):
        print(f"  {line} {where}")


def check_at_launch(config: TrainConfig) -> TrainConfig:
    """The config a launch trains with: on a CUDA device, `auto` UNet checkpointing settled by
    the memory plan, and a plan that cannot fit refused before anything loads; elsewhere (the
    CPU has no fixed memory to plan against) `auto` means off."""
    memory = launch_memory(config)
    if memory is None:
        return auto_off(config)
    world = world_size(config)
    planner = Planner()
    config = settle_auto_checkpointing(config, memory, world, planner)
    plan = planner.plan(config, world)
    if plan.peak > memory and config.trainer.memory_check:
        advice = _advice(changes_that_fit(config, memory, world, planner)).strip()
        raise PlanDoesNotFitError(
            f"the memory plan of this run needs {plan.peak / GiB:.2f} GiB per device, more than "
            f"the GPU's {memory / GiB:.2f} GiB; {advice} (`cnet-train plan CONFIG` shows the "
            "table; trainer.memory_check=false launches anyway)"
        )
    logger.info("memory plan: %.2f GiB per device of %.2f GiB", plan.peak / GiB, memory / GiB)
    return config


def launch_memory(config: TrainConfig) -> int | None:
    """The memory of the GPU the run trains on; None when it trains on the CPU."""
    return None if config.trainer.accelerator == "cpu" else device_memory()


def settle_auto_checkpointing(
    config: TrainConfig, memory: int, world: int, planner: Planner
) -> TrainConfig:
    """`config` with `auto` UNet checkpointing switched on where its plan does not fit `memory`
    without it, else off."""
    if config.controlnet.unet_gradient_checkpointing != "auto":
        return config
    off = auto_off(config)
    needed = planner.plan(off, world).peak
    if needed <= memory:
        return off
    logger.info(
        "UNet gradient checkpointing on: without it the memory plan needs %.2f GiB per device, "
        "more than the %.2f GiB there are",
        needed / GiB,
        memory / GiB,
    )
    return _with_unet_checkpointing(config, True)


def _on_off(config: TrainConfig) -> str:
    return "true" if config.controlnet.unet_gradient_checkpointing is True else "false"


def auto_off(config: TrainConfig) -> TrainConfig:
    """`config` with `auto` UNet checkpointing off."""
    if config.controlnet.unet_gradient_checkpointing != "auto":
        return config
    return _with_unet_checkpointing(config, False)


def _with_unet_checkpointing(config: TrainConfig, on: bool) -> TrainConfig:
    controlnet = attrs.evolve(config.controlnet, unet_gradient_checkpointing=on)
    return attrs.evolve(config, controlnet=controlnet)


def _advice(changes: list[str] | None) -> str:
    if changes is None:
        return "  no change cnet knows makes it fit: use more devices or a smaller bucket area"
    flags = " ".join(f"--set {item}" for item in changes)
    return f"  to fit: {flags}"
