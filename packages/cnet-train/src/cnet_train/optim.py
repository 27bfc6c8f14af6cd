"""The optimizer and learning-rate schedule of the ControlNet, from the config."""

from __future__ import annotations

import math
from collections.abc import Sequence

import lightning as L
import torch
from torch.optim.lr_scheduler import LambdaLR

from cnet_train.config import OptimizerConfig, ScheduleConfig


def build_optimizer(
    params: Sequence[torch.nn.Parameter], config: OptimizerConfig, trainer: L.Trainer | None
) -> torch.optim.Optimizer:
    """AdamW (fused on CUDA), 8-bit AdamW, or DeepSpeed's CPU Adam when it offloads."""
    common = {"lr": config.lr, "betas": config.betas, "weight_decay": config.weight_decay}
    if _deepspeed_offloads(trainer):
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        optimizer: torch.optim.Optimizer = DeepSpeedCPUAdam(params, eps=config.eps, **common)
        return optimizer
    if config.name == "adamw8bit":
        try:
            import bitsandbytes as bnb  # type: ignore[import-not-found,unused-ignore]
        except ImportError as exc:
            raise ImportError(
                "optimizer.name adamw8bit needs bitsandbytes: pip install 'cnet-train[bnb]'"
            ) from exc
        eight_bit: torch.optim.Optimizer = bnb.optim.AdamW8bit(params, eps=config.eps, **common)
        return eight_bit
    on_cuda = any(p.is_cuda for p in params)
    return torch.optim.AdamW(
        params,
        lr=config.lr,
        betas=config.betas,
        weight_decay=config.weight_decay,
        eps=config.eps,
        fused=on_cuda or None,  # one kernel for all parameters where it exists
    )


def _deepspeed_offloads(trainer: L.Trainer | None) -> bool:
    if trainer is None:
        return False
    config = getattr(trainer.strategy, "config", None)
    if not isinstance(config, dict):
        return False
    offload = config.get("zero_optimization", {}).get("offload_optimizer", {})
    return isinstance(offload, dict) and offload.get("device") == "cpu"


def lr_factor(step: int, config: ScheduleConfig, max_steps: int) -> float:
    """Multiplier of the peak learning rate at optimizer step `step` (0-based)."""
    if config.warmup_steps and step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    if config.name == "constant":
        return 1.0
    progress = (step - config.warmup_steps) / max(1, max_steps - config.warmup_steps)
    progress = min(1.0, max(0.0, progress))
    if config.name == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(
    optimizer: torch.optim.Optimizer, config: ScheduleConfig, max_steps: int
) -> LambdaLR:
    return LambdaLR(optimizer, lambda step: lr_factor(step, config, max_steps))
