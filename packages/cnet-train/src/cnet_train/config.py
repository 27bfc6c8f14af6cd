"""The training configuration: one frozen, typed, validated class per component.

Components that live in the other packages bring their own classes (the base model, the
ControlNet and the EMA from cnet-models; the source, scan, buckets and augmentation from
cnet-data); this module adds those of training and the root that holds them all. Loading YAML
into these classes, with overrides, is `cnet_train.config_io`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import attrs

from cnet_data.buckets import BucketSettings, bucket_settings
from cnet_data.dataset import AugmentConfig
from cnet_data.scan import ScanConfig
from cnet_data.sources import SourceConfig
from cnet_models.configs import BaseModelConfig, ControlNetConfig
from cnet_models.ema import EMAConfig
from cnet_train.conditioning_config import ConditioningConfig
from cnet_train.control_gain import ControlGainConfig
from cnet_train.loggers import LoggerConfig
from cnet_train.resume_setting import ResumeSetting, parse_resume

Precision = Literal["32", "bf16-mixed", "16-mixed"]
PrecisionSetting = Literal["auto", "32", "bf16-mixed", "16-mixed"]
"""A `Precision`, or `auto`: settled for the machine (`cnet_train.precision_auto`)."""
StrategyName = Literal["auto", "ddp", "deepspeed", "fsdp"]
ScheduleName = Literal[
    "constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"
]
"""The names of diffusers' `get_scheduler` that cnet offers (`piecewise_constant` needs rules
no config field holds)."""


SEED_MAX = 2**32 - 1
"""Largest seed: what numpy's and Lightning's seeding accept (torch takes more, numpy not)."""

Check = Callable[[Any, "attrs.Attribute[Any]", Any], None]
"""An attrs validator: `(instance, attribute, value)`, raising ValueError for a bad value."""


def _positive(_: object, attribute: attrs.Attribute[Any], value: int) -> None:
    if value < 1:
        raise ValueError(f"{attribute.name} must be at least 1, got {value}")


def _non_negative(_: object, attribute: attrs.Attribute[Any], value: float) -> None:
    if value < 0:
        raise ValueError(f"{attribute.name} must not be negative, got {value}")


def finite(*, above: float | None = None, at_least: float | None = None) -> Check:
    """A validator of a float that must be finite (NaN and infinity reach YAML as `.nan` and
    `.inf`, and would only show up as a NaN loss hours later) and, if given, `> above` or
    `>= at_least`."""
    bound = "" if above is None else f" > {above:g}"
    bound = bound if at_least is None else f" >= {at_least:g}"

    def check(_: object, attribute: attrs.Attribute[Any], value: float) -> None:
        low_ok = (above is None or value > above) and (at_least is None or value >= at_least)
        if not (math.isfinite(value) and low_ok):
            raise ValueError(f"must be a finite number{bound}, got {value}")

    return check


def optional(check: Check) -> Check:
    """`check` for a value that may also be null."""

    def maybe(instance: object, attribute: attrs.Attribute[Any], value: Any) -> None:
        if value is not None:
            check(instance, attribute, value)

    return maybe


def at_least_int(minimum: int) -> Check:
    """A validator of an integer that must be `>= minimum`."""

    def check(_: object, attribute: attrs.Attribute[Any], value: int) -> None:
        if value < minimum:
            raise ValueError(f"must be at least {minimum}, got {value}")

    return check


def _seed(_: object, attribute: attrs.Attribute[Any], value: int) -> None:
    if not 0 <= value <= SEED_MAX:
        raise ValueError(f"must be in [0, 2**32 - 1] (what numpy seeding takes), got {value}")


def _betas(_: object, attribute: attrs.Attribute[Any], value: tuple[float, float]) -> None:
    # Adam's moment decays: 1 would never forget, a negative one or above 1 diverges.
    bad = [f"item {i} is {beta}" for i, beta in enumerate(value) if not 0.0 <= beta < 1.0]
    if bad:
        raise ValueError(f"each must be in [0, 1): {', '.join(bad)}")


def _devices(_: object, attribute: attrs.Attribute[Any], value: int | str) -> None:
    if value != "auto" and isinstance(value, int) and value < 1:
        raise ValueError(f"must be at least 1 (or auto), got {value}")


def _resolution(_: object, attribute: attrs.Attribute[Any], value: int | None) -> None:
    # The VAE downsamples by 8: the pipelines refuse other sides.
    if value is not None and (value < 8 or value % 8):
        raise ValueError(f"must be a positive multiple of 8, got {value}")


def _non_empty(_: object, attribute: attrs.Attribute[Any], value: str) -> None:
    if not value:
        raise ValueError("must not be empty")


def _sub_folder(_: object, attribute: attrs.Attribute[Any], value: str) -> None:
    # Joined to the dataset root: an absolute path or `..` would leave it.
    parts = Path(value).parts
    if not value or Path(value).is_absolute() or ".." in parts:
        raise ValueError(f"must be a folder inside the dataset root, got {value!r}")


FOREIGN_CHECKS: dict[type, dict[str, Check]] = {
    SourceConfig: {
        "image_key": _non_empty,
        "conditioning_key": _non_empty,
        "caption_key": _non_empty,
        "image_dir": _sub_folder,
        "conditioning_dir": _sub_folder,
        "caption_suffix": _non_empty,
        "conditioning_extension": _non_empty,
        "split": _non_empty,
        "read_cache_gib": finite(at_least=0),
    },
    ScanConfig: {"max_pixels": at_least_int(1), "workers": at_least_int(0)},
    AugmentConfig: {"max_pixels": at_least_int(1)},
    EMAConfig: {"inv_gamma": finite(above=0), "power": finite(above=0)},
}
"""Checks of fields of the classes cnet-data and cnet-models bring, which those classes do not
make themselves (NaN and infinity pass their `<=` comparisons, for one). The config converter
runs them as it structures each field, like the fields' own validators, so that their errors
carry the key path too."""


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
    buckets: BucketSettings = attrs.field(factory=BucketSettings, converter=bucket_settings)
    """Aspect-ratio buckets: the keys set here, the rest from the base model's family (its
    resolution squared as the area; `model.family`, else the local model folder's UNet config;
    SDXL's when neither tells). `cnet_train.data.run_buckets` resolves them, as
    `cnet-data buckets --config` does."""
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


@attrs.frozen
class CacheConfig:
    """The text-embedding cache built by `cnet-train embed`."""

    path: Path | None = None
    """Cache directory; None: encode captions online in the training step."""
    batch_size: int = attrs.field(default=64, validator=_positive)
    """Captions encoded per batch by `cnet-train embed`."""


@attrs.frozen
class LatentCacheConfig:
    """The optional latent cache built by `cnet-train encode`: the VAE's latent distribution of
    every sample (per augmentation variant), so that the training step skips the VAE encode
    (18-33% of a step's FLOPs at full size)."""

    path: Path | None = None
    """Cache directory; None (the default): the VAE encodes each batch in the training step,
    which allows any augmentation. With a cache the augmentations are fixed: either none
    (data.augment.random_crop false, flip_probability 0) or data.augment.variants of them."""
    batch_size: int = attrs.field(default=16, validator=_positive)
    """Images per VAE batch in `cnet-train encode`. The VAE's convolutions round differently
    at different batch sizes (about 1e-6): latents encoded at the training batch size over the
    same batches, or at 1 for training at 1, equal the step's own bit for bit."""


@attrs.frozen
class OptimizerConfig:
    """The optimizer of the ControlNet's weights."""

    name: Literal["adamw", "adamw8bit"] = "adamw"
    """`adamw` (fused on CUDA) or `adamw8bit` (needs bitsandbytes); DeepSpeed strategies use
    DeepSpeed's own AdamW."""
    lr: float = attrs.field(default=1e-5, validator=finite(above=0))
    """Peak learning rate (finite, above 0)."""
    betas: tuple[float, float] = attrs.field(default=(0.9, 0.999), validator=_betas)
    """Adam's decay rates of the first and second moment estimates, each in [0, 1)."""
    weight_decay: float = attrs.field(default=1e-2, validator=finite(at_least=0))
    """Decoupled (AdamW) weight decay, 0 or more."""
    eps: float = attrs.field(default=1e-8, validator=finite(above=0))
    """Added to Adam's denominator for numerical stability; above 0."""


@attrs.frozen
class ScheduleConfig:
    """The learning-rate schedule: diffusers' `get_scheduler`, by its names, stepped once per
    optimizer step (`cnet_train.optim.build_scheduler`)."""

    name: ScheduleName = "constant"
    """diffusers' schedule: `constant` (no warm-up), `constant_with_warmup`, or after the
    warm-up `linear`, `cosine` (half a cosine), `cosine_with_restarts` (`num_cycles` hard
    restarts) or `polynomial` (to 1e-7 with `power`), each to its end at `trainer.max_steps`."""
    warmup_steps: int = attrs.field(default=0, validator=_non_negative)
    """Optimizer steps of linear warm-up from zero (the learning rate of step 0 is zero)."""
    num_cycles: int = attrs.field(default=1, validator=_positive)
    """Hard restarts of `cosine_with_restarts` (only that schedule reads it)."""
    power: float = attrs.field(default=1.0, validator=finite(above=0))
    """Exponent of the `polynomial` decay, above 0 (only that schedule reads it)."""

    def __attrs_post_init__(self) -> None:
        # diffusers' `constant` ignores `num_warmup_steps` without a word: refused rather than
        # mapped, so that a config says what runs and reads the same to anyone who knows
        # diffusers' names.
        if self.name == "constant" and self.warmup_steps:
            raise ValueError(
                f"schedule.name constant has no warm-up (diffusers' constant ignores it), but "
                f"schedule.warmup_steps is {self.warmup_steps}: use constant_with_warmup, or "
                "warmup_steps 0"
            )
        # The same for the shape options another schedule would silently ignore.
        for key, value, default, reader in (
            ("num_cycles", self.num_cycles, 1, "cosine_with_restarts"),
            ("power", self.power, 1.0, "polynomial"),
        ):
            if value != default and self.name != reader:
                raise ValueError(
                    f"schedule.{key} is read only by schedule.name {reader}, "
                    f"not by {self.name}: remove it, or use {reader}"
                )


@attrs.frozen
class LossConfig:
    """How the diffusion loss is formed."""

    min_snr_gamma: float | None = attrs.field(default=None, validator=optional(finite(above=0)))
    """Min-SNR-gamma loss weighting (5.0 is the paper's choice); None: unweighted."""
    noise_offset: float = attrs.field(default=0.0, validator=finite(at_least=0))
    """Add this much per-channel constant noise (helps very dark and bright images)."""


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
    """Denoising steps of each validation image."""
    guidance_scale: float = attrs.field(default=7.5, validator=finite())
    """Classifier-free guidance scale of the validation pipeline."""
    resolution: int | None = attrs.field(default=None, validator=_resolution)
    """Size of the validation images as the side of a square of the same area (a multiple of
    8): each image keeps its conditioning image's aspect, at the nearest `data.buckets` shape
    scaled to about this side squared pixels; None: the `data.buckets` shapes as they are."""
    seed: int = attrs.field(default=0, validator=_seed)
    """Seed of the validation images' noise, in [0, 2**32 - 1]."""

    def __attrs_post_init__(self) -> None:
        # Checked here, not when the validation callback starts: `cnet-train config` must
        # refuse what `launch` would refuse.
        if len(self.prompts) != len(self.images):
            raise ValueError(
                f"validation.prompts has {len(self.prompts)} entries but validation.images "
                f"has {len(self.images)}; they are paired by position"
            )


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
    """Checkpoints kept; older ones are deleted once a new one is complete."""
    resume: ResumeSetting = attrs.field(default="auto", converter=parse_resume)
    """`auto` (the newest complete checkpoint in the run directory, if any), `none`, or the path
    of a checkpoint (with a `/`, a `~` or a suffix: `cnet_train.resume_setting`); another word
    (`Auto`, `latest`) is refused with the choices when the config loads."""


@attrs.frozen
class TrainerConfig:
    """Devices, strategy, precision and the length of training."""

    max_steps: int = attrs.field(default=10_000, validator=_positive)
    """Optimizer steps to train for."""
    precision: PrecisionSetting = "auto"
    """Autocast precision of the trainable forward (the ControlNet's weights, its EMA and its
    exports stay float32 under every strategy; the frozen encoders run in their own dtype,
    outside autocast). `16-mixed` (with loss scaling) is for GPUs without bfloat16 and is not
    available with `strategy: deepspeed` or `fsdp`. `auto`: `bf16-mixed` on a CUDA GPU with
    bfloat16, `16-mixed` on an older one (`32` there under DeepSpeed and FSDP), `32` on the CPU
    (where bf16-mixed measured 17-35% slower per step); the run's resolved config records what
    it settled to, and a resumed run keeps what its checkpoint's run settled to."""
    strategy: StrategyName = "auto"
    """`auto` (one device), `ddp`, `deepspeed` or `fsdp` (FSDP2 through Lightning)."""
    deepspeed_stage: Literal[2, 3] = 2
    """ZeRO stage with `strategy: deepspeed`."""
    offload_optimizer: bool = False
    """DeepSpeed: keep optimizer state in CPU memory."""
    accelerator: Literal["auto", "cpu", "gpu"] = "auto"
    """`gpu` (CUDA), `cpu`, or `auto`: the GPUs if CUDA has any, else the CPU."""
    devices: int | Literal["auto"] = attrs.field(default="auto", validator=_devices)
    """Devices per node (at least 1; no more than the machine has), or `auto`: all of them."""
    num_nodes: int = attrs.field(default=1, validator=_positive)
    """Machines of a multi-node launch (SLURM or torchrun start one process per device)."""
    accumulate_grad_batches: int = attrs.field(default=1, validator=_positive)
    """Micro-batches per optimizer step."""
    gradient_clip_val: float | None = attrs.field(default=1.0, validator=optional(finite(above=0)))
    """Clip the gradient norm to this (above 0); None: no clipping."""
    compile: bool = False
    """`torch.compile` the down, mid and up blocks of the frozen UNet and the ControlNet, each on
    its own (regional compilation), with static shapes: every bucket shape compiles its own
    graphs the first time a batch of it arrives (the recompile limit is raised to the number of
    buckets), and reuses them after. The cost is one compile per bucket shape early in the run
    (seconds per shape on the tiny models, longer for SDXL); it pays off on long runs."""
    channels_last: bool = False
    """Keep the frozen UNet's convolution weights, the ControlNet's (with strategy auto or
    ddp) and the step's latents and control images in channels-last memory order, the layout
    cuDNN's fastest half-precision convolutions on NVIDIA GPUs work in (without it they convert
    at every convolution). Off until measured on the GPU in use: the `channels-last` row of
    benchmarks/gpu_throughput.py. Under DeepSpeed and FSDP the ControlNet's weights stay as
    they are (their flat parameter buffers keep no memory order)."""
    log_every_n_steps: int = attrs.field(default=10, validator=_positive)
    """Optimizer steps between logged scalars."""
    memory_check: bool = True
    """On a GPU, plan the run's memory per device before anything loads (`cnet-train plan`)
    and refuse a config whose plan exceeds the device, naming the settings that would fit.
    false: launch anyway (the plan keeps a margin of 1 GiB + 5% for the allocator and CUDA's
    own workspace, which a run may not need)."""

    def __attrs_post_init__(self) -> None:
        if self.strategy == "deepspeed" and self.precision == "16-mixed":
            raise ValueError(
                "trainer.precision 16-mixed is not available with trainer.strategy deepspeed: "
                "cnet keeps DeepSpeed's weights float32 under its own autocast, and float16 needs "
                "the loss scaling only DeepSpeed's fp16 mode (which casts the weights) provides; "
                "use bf16-mixed (or 32), or strategy ddp for 16-mixed"
            )
        if self.strategy == "fsdp" and self.precision == "16-mixed":
            raise ValueError(
                "trainer.precision 16-mixed is not available with trainer.strategy fsdp: "
                "Lightning's FSDP2 strategy has no float16 loss scaling; use bf16-mixed (or 32), "
                "or strategy ddp for 16-mixed"
            )


@attrs.frozen
class EMASettings:
    """Whether to keep an EMA of the ControlNet, and how."""

    enabled: bool = True
    """Keep the EMA (and export its twin of the ControlNet)."""
    config: EMAConfig = EMAConfig()
    """Decay, warm-up and update frequency of the EMA."""


@attrs.frozen
class TrainConfig:
    """Everything one training run needs; one YAML file."""

    run_dir: Path
    """Where checkpoints, exports, validation images, logs and the resolved config go (from a
    file, a relative path is relative to the file's folder)."""
    model: BaseModelConfig
    """The base model the ControlNet is trained for."""
    data: DataConfig
    """The training data."""
    seed: int = attrs.field(default=0, validator=_seed)
    """Seed of everything random in training, in [0, 2**32 - 1]."""
    controlnet: ControlNetConfig = ControlNetConfig()
    """The trainable ControlNet."""
    cache: CacheConfig = CacheConfig()
    """The text-embedding cache."""
    latents: LatentCacheConfig = LatentCacheConfig()
    """The optional latent cache."""
    optimizer: OptimizerConfig = OptimizerConfig()
    """The optimizer."""
    schedule: ScheduleConfig = ScheduleConfig()
    """The learning-rate schedule."""
    loss: LossConfig = LossConfig()
    """The diffusion loss."""
    conditioning: ConditioningConfig = ConditioningConfig()
    """Caption dropout and the ControlNet's residual scale during training."""
    ema: EMASettings = EMASettings()
    """The EMA of the ControlNet."""
    validation: ValidationConfig = ValidationConfig()
    """Validation images."""
    export: ExportConfig = ExportConfig()
    """Diffusers exports."""
    checkpoint: CheckpointConfig = CheckpointConfig()
    """Resumable checkpoints."""
    trainer: TrainerConfig = TrainerConfig()
    """Devices, strategy, precision, length."""
    logger: LoggerConfig = LoggerConfig()
    """Where scalars and validation images are logged: TensorBoard, CSV, wandb or MLflow."""
    control_gain: ControlGainConfig = ControlGainConfig()
    """The control gain (does the ControlNet use its condition?) measured at each validation."""

    def __attrs_post_init__(self) -> None:
        augment = self.data.augment
        if self.latents.path is not None and not augment.fixed and augment.variants == 0:
            raise ValueError(
                "latents.path is set but data.augment draws a new crop or flip every epoch, "
                "which a cache cannot hold: set data.augment.variants (e.g. 4) to cache that "
                "many variants, or data.augment.random_crop to false and flip_probability to 0"
            )
