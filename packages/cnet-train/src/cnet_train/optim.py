"""The optimizer and learning-rate schedule of the ControlNet, from the config."""

from __future__ import annotations

from collections.abc import Sequence

import lightning as L
import torch
from torch.optim.lr_scheduler import LambdaLR

from cnet_models.facade import lr_scheduler
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


POLYNOMIAL_END_LR = 1e-7
"""Where diffusers' `polynomial` schedule ends (its `get_scheduler` fixes it); the peak
learning rate must lie above it."""


def build_scheduler(
    optimizer: torch.optim.Optimizer, config: ScheduleConfig, max_steps: int
) -> LambdaLR:
    """diffusers' schedule `config.name`, for a scheduler Lightning steps once per optimizer
    step (`interval: step`) on every rank.

    The step counts are not multiplied by the number of processes, as diffusers' training
    scripts do: there accelerate steps the scheduler once per process for each optimizer step;
    here it sees each optimizer step once, so `warmup_steps` and `max_steps` are in the
    optimizer steps `trainer.max_steps` counts, on any number of devices."""
    lr = float(optimizer.defaults["lr"])
    if config.name == "polynomial" and not lr > POLYNOMIAL_END_LR:
        raise ValueError(
            f"schedule.name polynomial decays to {POLYNOMIAL_END_LR:g}, but optimizer.lr is "
            f"{lr:g}: raise the learning rate, or choose another schedule"
        )
    return lr_scheduler(
        config.name,
        optimizer,
        warmup_steps=config.warmup_steps,
        training_steps=max_steps,
        num_cycles=config.num_cycles,
        power=config.power,
    )
