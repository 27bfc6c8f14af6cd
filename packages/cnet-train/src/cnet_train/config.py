"""The training configuration: one frozen, typed, validated class per component.

Components that live in the other packages bring their own classes (the base model, the
ControlNet and the EMA from cnet-models; the source, scan, buckets and augmentation from
cnet-data); this module adds those of training and the root that holds them all. Loading YAML
into these classes, with overrides, is `cnet_train.config_io`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import attrs

from cnet_data.buckets import BucketConfig
from cnet_data.dataset import AugmentConfig
from cnet_data.scan import ScanConfig
from cnet_data.sources import SourceConfig
from cnet_models.configs import BaseModelConfig, ControlNetConfig
from cnet_models.ema import EMAConfig

Precision = Literal["32", "bf16-mixed", "16-mixed"]
StrategyName = Literal["auto", "ddp", "deepspeed", "fsdp"]


def _positive(_: object, attribute: attrs.Attribute[Any], value: int) -> None:
    if value < 1:
        raise ValueError(f"{attribute.name} must be at least 1, got {value}")


def _non_negative(_: object, attribute: attrs.Attribute[Any], value: float) -> None:
    if value < 0:
        raise ValueError(f"{attribute.name} must not be negative, got {value}")


def _probability(_: object, attribute: attrs.Attribute[Any], value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{attribute.name} must be in [0, 1], got {value}")


@attrs.frozen
class DataConfig:
    """The dataset, its index, buckets and loading."""

    source: SourceConfig
    """The JSONL manifest, folder of pairs or prompt.json to train on."""
    index: Path | None = None
    """Where the dataset index is (written by `cnet-data index`); default: RUN_DIR/index,
    built at launch if missing."""
    scan: ScanConfig = ScanConfig(on_bad="skip")
    """How the index is built when the launch builds it."""
    buckets: BucketConfig = BucketConfig()
    """Aspect-ratio buckets; set `area` to the family's resolution squared."""
    augment: AugmentConfig = AugmentConfig()
    """Paired augmentation of image and conditioning image."""
    batch_size: int = attrs.field(default=4, validator=_positive)
    """Samples per batch on each device."""
    num_workers: int = attrs.field(default=4, validator=_non_negative)
    """DataLoader worker processes per device."""
    prefetch_factor: int = attrs.field(default=2, validator=_positive)
    """Batches each worker prepares ahead (with workers only)."""
    pin_memory: bool = True
    """Page-locked host memory for faster copies to the GPU (ignored on CPU)."""
    caption_dropout: float = attrs.field(default=0.05, validator=_probability)
    """Chance, drawn at every step for every sample, that its caption is replaced by the empty
    prompt: what classifier-free guidance needs at inference."""


@attrs.frozen
class CacheConfig:
    """The text-embedding cache built by `cnet-train embed`."""

    path: Path | None = None
    """Cache directory; None: encode captions online in the training step."""
    batch_size: int = attrs.field(default=64, validator=_positive)
    """Captions encoded per batch by `cnet-train embed`."""


@attrs.frozen
class OptimizerConfig:
    """The optimizer of the ControlNet's weights."""

    name: Literal["adamw", "adamw8bit"] = "adamw"
    """`adamw` (fused on CUDA) or `adamw8bit` (needs bitsandbytes); DeepSpeed strategies use
    DeepSpeed's own AdamW."""
    lr: float = attrs.field(default=1e-5, validator=_non_negative)
    """Peak learning rate."""
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = attrs.field(default=1e-2, validator=_non_negative)
    eps: float = 1e-8


@attrs.frozen
class ScheduleConfig:
    """The learning-rate schedule."""

    name: Literal["constant", "linear", "cosine"] = "constant"
    """Shape after warm-up: flat, linear to zero, or cosine to zero at `trainer.max_steps`."""
    warmup_steps: int = attrs.field(default=0, validator=_non_negative)
    """Optimizer steps of linear warm-up from zero."""


@attrs.frozen
class LossConfig:
    """How the diffusion loss is formed."""

    min_snr_gamma: float | None = None
    """Min-SNR-gamma loss weighting (5.0 is the paper's choice); None: unweighted."""
    noise_offset: float = attrs.field(default=0.0, validator=_non_negative)
    """Add this much per-channel constant noise (helps very dark and bright images)."""
    conditioning_scale: float = 1.0
    """Scale of the ControlNet residuals during training."""


@attrs.frozen
class ValidationConfig:
    """Validation images from the real diffusers ControlNet pipeline."""

    every_n_steps: int = attrs.field(default=0, validator=_non_negative)
    """0: no validation during training (one run at the end still happens if prompts are set)."""
    prompts: tuple[str, ...] = ()
    """Fixed prompts, each paired with the conditioning image at the same position."""
    images: tuple[Path, ...] = ()
    """Conditioning images, one per prompt."""
    num_inference_steps: int = attrs.field(default=20, validator=_positive)
    guidance_scale: float = 7.5
    resolution: int | None = None
    """Square side of the validation images; None: the family's default resolution."""
    seed: int = 0


@attrs.frozen
class ExportConfig:
    """Diffusers-format exports of the ControlNet (and its EMA twin)."""

    every_n_steps: int = attrs.field(default=0, validator=_non_negative)
    """0: only at the end of training."""
    keep_last: int = attrs.field(default=2, validator=_positive)
    """Exports kept; older ones are deleted once a new one is complete."""


@attrs.frozen
class CheckpointConfig:
    """Full training checkpoints, for resume."""

    every_n_steps: int = attrs.field(default=500, validator=_non_negative)
    """0: no periodic checkpoints (one is still written at the end)."""
    keep_last: int = attrs.field(default=2, validator=_positive)
    resume: str = "auto"
    """`auto` (the newest complete checkpoint in the run directory, if any), `none`, or a path."""


@attrs.frozen
class TrainerConfig:
    """Devices, strategy, precision and the length of training."""

    max_steps: int = attrs.field(default=10_000, validator=_positive)
    """Optimizer steps to train for."""
    precision: Precision = "bf16-mixed"
    """Autocast precision of the trainable forward (the ControlNet's weights, its EMA and its
    exports stay float32 under every strategy; the frozen encoders run in their own dtype,
    outside autocast). `16-mixed` (with loss scaling) is for GPUs without bfloat16 and is not
    available with `strategy: deepspeed`."""
    strategy: StrategyName = "auto"
    """`auto` (one device), `ddp`, `deepspeed` or `fsdp` (FSDP2 through Lightning)."""
    deepspeed_stage: Literal[2, 3] = 2
    """ZeRO stage with `strategy: deepspeed`."""
    offload_optimizer: bool = False
    """DeepSpeed: keep optimizer state in CPU memory."""
    accelerator: Literal["auto", "cpu", "gpu"] = "auto"
    devices: int | Literal["auto"] = "auto"
    """Devices per node."""
    num_nodes: int = attrs.field(default=1, validator=_positive)
    accumulate_grad_batches: int = attrs.field(default=1, validator=_positive)
    gradient_clip_val: float | None = 1.0
    """Clip the gradient norm to this; None: no clipping."""
    compile: bool = False
    """`torch.compile` the down, mid and up blocks of the frozen UNet and the ControlNet, each on
    its own (regional compilation), with static shapes: every bucket shape compiles its own
    graphs the first time a batch of it arrives (the recompile limit is raised to the number of
    buckets), and reuses them after. The cost is one compile per bucket shape early in the run
    (seconds per shape on the tiny models, longer for SDXL); it pays off on long runs."""
    log_every_n_steps: int = attrs.field(default=10, validator=_positive)

    def __attrs_post_init__(self) -> None:
        if self.strategy == "deepspeed" and self.precision == "16-mixed":
            raise ValueError(
                "trainer.precision 16-mixed is not available with trainer.strategy deepspeed: "
                "cnet keeps DeepSpeed's weights float32 under its own autocast, and float16 needs "
                "the loss scaling only DeepSpeed's fp16 mode (which casts the weights) provides; "
                "use bf16-mixed, or strategy ddp / fsdp for 16-mixed"
            )


@attrs.frozen
class EMASettings:
    """Whether to keep an EMA of the ControlNet, and how."""

    enabled: bool = True
    config: EMAConfig = EMAConfig()


@attrs.frozen
class TrainConfig:
    """Everything one training run needs; one YAML file."""

    run_dir: Path
    """Where checkpoints, exports, validation images, logs and the resolved config go."""
    model: BaseModelConfig
    data: DataConfig
    seed: int = 0
    controlnet: ControlNetConfig = ControlNetConfig()
    cache: CacheConfig = CacheConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    loss: LossConfig = LossConfig()
    ema: EMASettings = EMASettings()
    validation: ValidationConfig = ValidationConfig()
    export: ExportConfig = ExportConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    trainer: TrainerConfig = TrainerConfig()
