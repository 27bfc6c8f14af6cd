"""The memory plan where a run meets a machine: `cnet-train plan`, and the check at launch."""

from __future__ import annotations

import logging

import torch

from cnet_data.errors import CnetError
from cnet_train.config import TrainConfig
from cnet_train.memory_fix import changes_that_fit, parse_memory, report
from cnet_train.memory_plan import Planner

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
    """Print the plan of `config`; 1 if it does not fit (and what would), else 0."""
    memory = parse_memory(memory_text) if memory_text is not None else device_memory()
    world = devices if devices is not None else world_size(config)
    planner = Planner()
    plan = planner.plan(config, world)
    print(report(plan, memory, world))
    if memory is None:
        print("  no GPU here: give --memory (e.g. --memory 80GiB) to check a fit")
        return 0
    if plan.peak <= memory:
        return 0
    print(_advice(changes_that_fit(config, memory, world, planner)))
    return 1


def _advice(changes: list[str] | None) -> str:
    if changes is None:
        return "  no change cnet knows makes it fit: use more devices or a smaller bucket area"
    flags = " ".join(f"--set {item}" for item in changes)
    return f"  to fit: {flags}"
