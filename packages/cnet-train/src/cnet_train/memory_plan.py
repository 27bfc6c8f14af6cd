"""The memory plan of a run: the peak bytes per device, by component, before anything loads.

Weights, gradients, optimizer state and EMA are counted exactly from the networks built on the
meta device from their configs (`cnet_models.arch_source`), in the dtypes and on the devices
training puts them; the activations are measured by running one step of those networks on the
meta device at the largest bucket (`cnet_train.memory_step`). What no count can see (the CUDA
context, cuBLAS workspaces, the allocator's rounding and fragmentation) is a stated margin.
"""

from __future__ import annotations

import attrs
import torch

from cnet_data.buckets import BucketTable
from cnet_models.arch_source import MetaNetworks, arch_configs, meta_networks
from cnet_train.config import TrainConfig
from cnet_train.data import run_buckets
from cnet_train.memory_step import StepMemory, StepShape, trace_step

GiB = 2**30
MARGIN_BYTES = GiB
"""Fixed part of the margin: the CUDA context and library workspaces."""
MARGIN_FRACTION = 0.05
"""Share of the counted bytes added for the allocator's rounding and fragmentation."""
DEEPSPEED_BUCKET_BYTES = 2 * 10**8 * 4
"""The float32 gradient-reduction bucket of ZeRO-1/2: Lightning's `reduce_bucket_size` of
2e8 elements."""


@attrs.frozen
class MemoryPlan:
    """Bytes per device of one run, by component."""

    frozen: int
    """The frozen UNet, VAE and text encoders (all on the device, with caches too)."""
    trainable: int
    """The ControlNet's weights (float32; this device's shard where sharded)."""
    gradients: int
    optimizer: int
    ema: int
    """The EMA shadow where it lives on the device (none with `ema.device: cpu`)."""
    step: StepMemory
    """Activations and the other bytes of one step at the largest bucket."""
    batch: int
    bucket: tuple[int, int]
    """(height, width) of the largest bucket."""
    origin: str
    """Where the architectures came from."""

    @property
    def static(self) -> int:
        return self.frozen + self.trainable + self.gradients + self.optimizer + self.ema

    @property
    def transient(self) -> int:
        """The most one step adds: the encoders' peak, or the activations and the backward."""
        return max(self.step.encode_peak, self.step.saved + self.step.backward_extra)

    @property
    def margin(self) -> int:
        return MARGIN_BYTES + int(MARGIN_FRACTION * (self.static + self.transient))

    @property
    def peak(self) -> int:
        return self.static + self.transient + self.margin

    def rows(self) -> list[tuple[str, int]]:
        """(component, bytes) in the order of the report."""
        return [
            ("frozen weights", self.frozen),
            ("ControlNet weights", self.trainable),
            ("gradients", self.gradients),
            ("optimizer state", self.optimizer),
            ("EMA", self.ema),
            ("frozen encoders' peak", self.step.encode_peak),
            ("activations", self.step.saved),
            ("backward beyond them", self.step.backward_extra),
            ("margin", self.margin),
            ("peak", self.peak),
        ]


def nbytes(module: torch.nn.Module, *, trainable: bool | None = None) -> int:
    """Bytes of `module`'s parameters (only the trainable or frozen ones if asked) and, for
    the whole module, its buffers."""
    params = [p for p in module.parameters() if trainable is None or p.requires_grad == trainable]
    total = sum(p.numel() * p.element_size() for p in params)
    if trainable is None:
        total += sum(b.numel() * b.element_size() for b in module.buffers())
    return total


def optimizer_bytes(controlnet: torch.nn.Module, name: str) -> int:
    """AdamW: two float32 moments per weight and a float32 step count per tensor. 8-bit AdamW
    (bitsandbytes): one byte per moment and a float32 scale per block of 256, for tensors of at
    least 4096 elements; smaller ones keep 32-bit moments."""
    params = [p for p in controlnet.parameters() if p.requires_grad]
    if name != "adamw8bit":
        return sum(8 * p.numel() + 4 for p in params)
    total = 0
    for p in params:
        n = p.numel()
        total += 2 * (n + 4 * -(-n // 256)) + 4 if n >= 4096 else 8 * n + 4
    return total


class Planner:
    """Plans of one run's configs and their variations; a step is traced once per setting
    that changes it (batch, checkpointing, precision, the text encoders in the step)."""

    def __init__(self) -> None:
        self._steps: dict[tuple[object, ...], tuple[MetaNetworks, StepMemory, str, str]] = {}

    def plan(self, config: TrainConfig, world: int = 1) -> MemoryPlan:
        """The plan of `config` on each of `world` devices."""
        bucket = largest_bucket(config)
        nets, step, _, origin = self._step(config, bucket)
        return _plan(config, nets, step, world=world, origin=origin, bucket=bucket)

    def _step(
        self, config: TrainConfig, bucket: tuple[int, int]
    ) -> tuple[MetaNetworks, StepMemory, str, str]:
        c = config.controlnet
        shape = StepShape(
            config.data.batch_size,
            *bucket,
            encode_text=config.cache.path is None,
            encode_images=config.latents.path is None,
        )
        key = (
            c.gradient_checkpointing,
            c.unet_gradient_checkpointing is True,
            shape,
            config.trainer.precision,
            config.model.frozen_dtype,
        )
        if key not in self._steps:
            arch = arch_configs(config.model, c)
            nets = meta_networks(arch, config.model, c)
            scale = config.conditioning.scale
            step = trace_step(nets, arch.family, shape, config.trainer.precision, scale)
            self._steps[key] = (nets, step, arch.family, arch.origin)
        return self._steps[key]


def plan_memory(config: TrainConfig, world: int = 1) -> MemoryPlan:
    """The plan of `config` on each of `world` devices."""
    return Planner().plan(config, world)


def largest_bucket(config: TrainConfig) -> tuple[int, int]:
    table = BucketTable.from_config(run_buckets(config).config)
    return max(((b.height, b.width) for b in table.buckets), key=lambda hw: hw[0] * hw[1])


def _plan(
    config: TrainConfig,
    nets: MetaNetworks,
    step: StepMemory,
    *,
    world: int,
    origin: str,
    bucket: tuple[int, int],
) -> MemoryPlan:
    trainer = config.trainer
    weights = nbytes(nets.controlnet, trainable=True)
    optimizer = optimizer_bytes(nets.controlnet, config.optimizer.name)
    ema = weights if config.ema.enabled and config.ema.config.device == "same" else 0
    gradients = weights
    # With an embedding cache the text encoders wait on the CPU: validation brings them over
    # to render between steps, when the step's activations are freed. The VAE stays (it
    # decodes the renders, and encodes a batch a latent cache lacks).
    cached = config.cache.path is not None
    encoders = 0 if cached else sum(nbytes(e) for e in nets.text_encoders)
    frozen = nbytes(nets.unet) + nbytes(nets.vae) + encoders
    if trainer.strategy == "fsdp":
        # FSDP2: weights, gradients, moments and the EMA's shadow are this rank's shards.
        weights, gradients, optimizer, ema = (
            -(-x // world) for x in (weights, gradients, optimizer, ema)
        )
    elif trainer.strategy == "deepspeed":
        # ZeRO keeps a float32 master partition beside the (float32) weights and partitions
        # the gradients and moments; stage 3 partitions the weights too.
        master = -(-weights // world)
        gradients = master + min(weights, DEEPSPEED_BUCKET_BYTES)
        optimizer = 0 if trainer.offload_optimizer else master + -(-optimizer // world)
        weights = master if trainer.deepspeed_stage == 3 else weights
    return MemoryPlan(
        frozen, weights, gradients, optimizer, ema, step, config.data.batch_size, bucket, origin
    )
