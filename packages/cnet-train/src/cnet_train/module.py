"""`ControlNetModule`: the Lightning module that trains a ControlNet on a frozen base model.

Only the trainable ControlNet is registered as a submodule. The frozen UNet, VAE and text
encoders live in `self.base`, outside the module tree, so that no strategy sees them: DDP does
not track them, FSDP2 and ZeRO-3 do not shard them, DeepSpeed does not cast them to its half
dtype, and no checkpoint of any strategy holds them (they reload from their source). `setup`
moves them to the device, each in its own dtype.

Every random draw of a step (VAE latent sample, noise, timesteps, caption dropout) comes from a
generator seeded by (seed, optimizer step, micro-batch, rank), not from the global RNG: a
resumed run draws exactly what an uninterrupted one would, with no RNG state in the checkpoint,
and the micro-batches of one accumulated optimizer step draw differently.

The frozen encoders run outside autocast, in their own dtype (a VAE kept in float32 for
`force_upcast` computes in float32 under every precision); only the controlled UNet forward runs
under autocast, which the module enters itself, so that it holds under DeepSpeed too (there
Lightning hands DeepSpeed float32 weights and no autocast of its own).
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from typing_extensions import override

from cnet_data.batch import Batch
from cnet_data.buckets import BucketTable
from cnet_data.captions import caption_key_hex
from cnet_data.dataset import ControlNetDataset
from cnet_data.embcache import EmbeddingCache
from cnet_models.controlled import AddedConditioning, ControlledUNet, make_controlnet
from cnet_models.facade import (
    AutoencoderKL,
    UNet2DConditionModel,
    vae_encode_mean_and_sample,
    vae_sample_from_moments,
)
from cnet_models.loading import BaseModel, load_base_model
from cnet_models.noise import NoiseSchedule
from cnet_models.pipelines import unconditional_is_zeros
from cnet_models.text import PromptEmbeddings, zero_rows
from cnet_train.config import TrainConfig
from cnet_train.data import run_buckets
from cnet_train.host_side import dropout_draws, to_device
from cnet_train.latent_cache import LatentCache, open_latent_cache
from cnet_train.optim import build_optimizer, build_scheduler
from cnet_train.precision_auto import dtype_hint, settle_here
from cnet_train.resume_check import check_resume, record_run

_EMPTY_KEY = caption_key_hex("")
"""The cache key of the empty prompt, which caption dropout swaps in."""
_AUTOCAST_DTYPES = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}


class ControlNetModule(L.LightningModule):
    """Frozen UNet, VAE and text encoders; a trainable ControlNet; the diffusion loss."""

    def __init__(self, config: TrainConfig, base: BaseModel | None = None) -> None:
        super().__init__()
        # `fit` settles `auto` before; a module made on its own settles here, for this machine.
        config = settle_here(config, frozen=None if base is None else base.unet.dtype)
        self.config = config
        base = base if base is not None else load_base_model(config.model)
        self.family = base.family
        self.base = base  # not a Module: the frozen parts stay outside the module tree
        self.controlnet = make_controlnet(base.unet, config.controlnet)
        self.schedule = NoiseSchedule(base.scheduler)
        self.prompt_encoder = base.prompt_encoder()
        self.vae_scaling_factor = base.vae_scaling_factor
        self.cache: EmbeddingCache | None = None
        self.latent_cache: LatentCache | None = None
        """The latents of `latents.path`, opened (and checked against this run) in `setup`."""
        self.zero_unconditional = unconditional_is_zeros(
            config.conditioning.caption_dropout_embedding, base.family, config.model
        )
        """Dropped captions become all-zero embeddings, else the empty prompt's: by default
        what the family's pipeline feeds unconditioned at inference (validation renders so)."""

    @property
    def unet(self) -> UNet2DConditionModel:
        return self.base.unet

    @property
    def vae(self) -> AutoencoderKL:
        return self.base.vae

    @property
    def controlled(self) -> ControlledUNet:
        """The frozen UNet steered by the ControlNet (a light wrapper, made when asked, so that
        it never registers the UNet in this module's tree)."""
        return ControlledUNet(self.base.unet, self.controlnet)

    # -- Lightning hooks -----------------------------------------------------------------------

    @override
    def setup(self, stage: str) -> None:
        # The strategy moves only the registered ControlNet; the frozen parts follow here.
        trainer = self._trainer
        path = self.config.cache.path
        with dtype_hint():
            if path is not None and self.cache is None:
                fingerprint = self.prompt_encoder.fingerprint(self.config.model.source)
                self.cache = EmbeddingCache(path, expected_fingerprint=fingerprint)
            self._open_latent_cache(trainer)
        if trainer is not None:
            # With the embedding cache open, the step never runs the text encoders: they stay
            # on the CPU (SDXL's two hold 1.6 GB in bfloat16) and visit the device to render.
            self.base.to_device(trainer.strategy.root_device, text_encoders=self.cache is None)

    def _open_latent_cache(self, trainer: L.Trainer | None) -> None:
        datamodule = getattr(trainer, "datamodule", None)
        dataset = getattr(datamodule, "dataset", None)
        if self.config.latents.path is not None and self.latent_cache is None:
            if not isinstance(dataset, ControlNetDataset):
                raise RuntimeError(
                    "latents.path is set, but the trainer has no cnet data module to check "
                    "the cache against: fit the module with ControlNetDataModule"
                )
            self.latent_cache = open_latent_cache(self.config, self.vae, dataset)

    @override
    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """With a latent cache, the batch's stored moments join it here, on the host, before
        the transfer to the device (their keys come from host tensors, so no sync)."""
        if self.latent_cache is None:
            return batch
        moments = self.latent_cache.moments(batch)
        if moments is None:  # not all stored: encoded in the step
            return batch
        if self.device.type == "cuda":  # a copy from pageable memory would wait for the GPU
            moments = moments.pin_memory()
        return {**batch, "moments": moments}

    @override
    def configure_optimizers(self) -> Any:
        params = [p for p in self.controlnet.parameters() if p.requires_grad]
        optimizer = build_optimizer(params, self.config.optimizer, self.trainer)
        scheduler = build_scheduler(optimizer, self.config.schedule, self.config.trainer.max_steps)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    @override
    def configure_model(self) -> None:
        if self.config.trainer.channels_last:
            self._to_channels_last()
        self._shard_for_fsdp2()
        if self.config.trainer.compile:
            self._compile_blocks()

    def _to_channels_last(self) -> None:
        """The convolution weights in channels-last order (`trainer.channels_last`)."""
        models: list[torch.nn.Module] = [self.unet]
        if self.config.trainer.strategy in ("auto", "ddp"):
            models.append(self.controlnet)
        # What `Module.to(memory_format=...)` does (which torch's stubs do not type): every 4-D
        # weight re-laid in place, the parameter objects kept.
        with torch.no_grad():
            for model in models:
                for param in model.parameters():
                    if param.ndim == 4:
                        param.data = param.data.contiguous(memory_format=torch.channels_last)

    def _layout(self, images: torch.Tensor) -> torch.Tensor:
        """`images` in the memory order the convolutions' weights are in."""
        if not self.config.trainer.channels_last:
            return images
        return images.contiguous(memory_format=torch.channels_last)

    def _compile_blocks(self) -> None:
        """Regional compilation: each down, mid and up block of the UNet and ControlNet compiles
        on its own, in place (parameter names, hence checkpoints and exports, do not change).

        Static shapes, one graph per bucket shape: Inductor's dynamic-shape lowering of these
        blocks fails ("cannot determine truth value of Relational") at the first change of
        bucket. The recompile limit is raised to the number of buckets so that every bucket
        keeps its compiled graph instead of falling back to eager after the default eight.
        """
        import torch._dynamo.config as dynamo_config

        buckets = len(BucketTable.from_config(run_buckets(self.config).config))
        dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, buckets)
        unet, controlnet = self.unet, self.controlnet
        for block in [*unet.down_blocks, unet.mid_block, *unet.up_blocks]:
            block.compile(dynamic=False)
        for block in [*controlnet.down_blocks, controlnet.mid_block]:
            block.compile(dynamic=False)

    def _shard_for_fsdp2(self) -> None:
        mesh = self.device_mesh  # set by ModelParallelStrategy (trainer.strategy: fsdp)
        if mesh is None:
            return
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        # FSDP2: shard the trainable ControlNet block by block; the frozen parts stay whole.
        # Under a mixed precision the shards are gathered in the half dtype autocast computes
        # in anyway (half the traffic, and half the memory of the gathered copy); gradients
        # are reduced in float32, and the sharded weights the optimizer steps stay float32.
        # The inputs are left as they come (autocast casts them per operation): a cast at the
        # boundary would round a sampler's float timesteps (999 -> 1000 in bfloat16).
        options: dict[str, Any] = {"mesh": mesh["data_parallel"]}
        if (half := self.gathered_dtype) is not None:
            options["mp_policy"] = MixedPrecisionPolicy(
                param_dtype=half, reduce_dtype=torch.float32, cast_forward_inputs=False
            )
        for block in [*self.controlnet.down_blocks, self.controlnet.mid_block]:
            fully_shard(block, **options)
        fully_shard(self.controlnet, **options)

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # The resolved config and the ControlNet's architecture travel with the weights:
        # `cnet-train export` needs neither the YAML nor the base model, and a resume compares
        # the config and the weights' names with its own (`on_load_checkpoint`).
        record_run(checkpoint, self.config, self._world_size(), self._weight_names())
        checkpoint["cnet_controlnet_config"] = dict(self.controlnet.config)

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Before any weight is loaded: refuse another run's checkpoint, note changed settings.
        trainer = self._trainer
        check_resume(
            checkpoint,
            self.config,
            self._world_size(),
            self._weight_names(),
            source=str(getattr(trainer, "ckpt_path", None) or "the checkpoint"),
            report=trainer is None or trainer.is_global_zero,
        )

    def _world_size(self) -> int:
        return self._trainer.world_size if self._trainer is not None else 1

    def _weight_names(self) -> list[str]:
        return list(self.state_dict(keep_vars=True))

    @override
    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        # Lightning steps the optimizer after every `accumulate` batches of an epoch.
        micro = batch_idx % self.config.trainer.accumulate_grad_batches
        loss = self.loss(batch, self.global_step, micro)
        # Not `prog_bar=True`: Lightning would read the value to the host after every batch
        # for its bar's metrics; cnet's bar reads it from the callback metrics when it shows it.
        self.log("train/loss", loss.detach())
        return loss

    # -- the loss ------------------------------------------------------------------------------

    def step_generator(self, step: int, micro: int = 0) -> torch.Generator:
        """The generator of one micro-batch: a pure function of (seed, step, micro, rank)."""
        seed = ((self.config.seed * 1_000_003 + step) * 1031 + micro) * 4099 + self.global_rank
        return torch.Generator(device=self.device).manual_seed(seed % (2**63))

    @property
    def gathered_dtype(self) -> torch.dtype | None:
        """The dtype FSDP2 gathers the ControlNet's weights in for a forward (a mixed
        precision's half dtype; None: the weights compute as stored)."""
        if self.config.trainer.strategy != "fsdp":
            return None
        return _AUTOCAST_DTYPES.get(self.config.trainer.precision)

    def autocast(self) -> AbstractContextManager[Any]:
        """Autocast of the trainable forward for `trainer.precision` (off for 32)."""
        dtype = _AUTOCAST_DTYPES.get(self.config.trainer.precision)
        return torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None)

    def loss(self, batch: Batch, step: int, micro: int = 0) -> torch.Tensor:
        """The (min-SNR weighted) diffusion loss of `batch`, with the draws of (`step`,
        `micro`)."""
        g = self.step_generator(step, micro)
        images = batch["image"]
        batch_size = images.shape[0]
        # Frozen encoders in their own dtype: autocast would run a float32 VAE in half.
        with torch.no_grad(), torch.autocast(self.device.type, enabled=False):
            latents = self.latents_of(batch, g)
            text = self.condition(batch, g)
        noise = torch.randn(latents.shape, generator=g, device=self.device, dtype=latents.dtype)
        if self.config.loss.noise_offset:
            offset = torch.randn(
                (batch_size, latents.shape[1], 1, 1), generator=g, device=self.device
            )
            noise = noise + self.config.loss.noise_offset * offset
        timesteps = torch.randint(
            0, self.schedule.num_train_timesteps, (batch_size,), generator=g, device=self.device
        )
        noisy = self.schedule.add_noise(latents, noise, timesteps)
        target = self.schedule.target(latents, noise, timesteps)
        added = self.added_conditioning(batch, text)
        with self.autocast():
            prediction = self.controlled(
                self._layout(noisy),
                timesteps,
                text.prompt_embeds,
                self._layout(batch["conditioning_image"]),
                conditioning_scale=self.config.conditioning.scale,
                added=added,
            )
        per_sample = F.mse_loss(prediction.float(), target.float(), reduction="none")
        per_sample = per_sample.mean(dim=tuple(range(1, per_sample.ndim)))
        gamma = self.config.loss.min_snr_gamma
        if gamma is not None:
            per_sample = per_sample * self.schedule.min_snr_weights(timesteps, gamma)
        return per_sample.mean()

    def latents_of(self, batch: Batch, g: torch.Generator) -> torch.Tensor:
        """The batch's latents: drawn from its cached moments where the latent cache put them
        in the batch (the same draw as from the VAE's own output), else encoded now."""
        moments: torch.Tensor | None = batch.get("moments")  # type: ignore[assignment]
        if moments is None:
            return self.encode_images(batch["image"], g)
        return vae_sample_from_moments(moments, g).float() * self.vae_scaling_factor

    def encode_images(self, images: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """Latents of images in [-1, 1], encoded on the fly (augmentation stays possible)."""
        latents = vae_encode_mean_and_sample(self.vae, images.to(self.vae.dtype), g)
        return latents.float() * self.vae_scaling_factor

    def condition(self, batch: Batch, g: torch.Generator) -> PromptEmbeddings:
        """Text conditioning, with captions dropped (drawn now, at every step) for CFG: to the
        empty prompt's embedding, or to zeros of the same shapes (`zero_unconditional`).

        The drops are drawn on the host, from `g`'s seed (so still a pure function of (seed,
        step, micro, rank)): the captions are host data, and a mask drawn on the device would
        cost a device-to-host copy, which waits for the GPU, at every step."""
        captions = list(batch["caption"])
        dropped = dropout_draws(len(captions), self.config.conditioning.caption_dropout, g)
        if self.cache is None:
            kept = ["" if d else c for c, d in zip(captions, dropped, strict=True)]
            text = self.prompt_encoder.encode(kept)
        else:
            text = self._cached_condition(self.cache, batch, dropped)
        if not (self.zero_unconditional and any(dropped)):
            return text
        return zero_rows(text, to_device(torch.tensor(dropped), self.device))

    def _cached_condition(
        self, cache: EmbeddingCache, batch: Batch, dropped: list[bool]
    ) -> PromptEmbeddings:
        """The cached embeddings of the batch's captions, the empty prompt's where dropped."""
        keys = [_EMPTY_KEY if d else k for k, d in zip(batch["caption_key"], dropped, strict=True)]
        stored = cache.get_many(keys)
        dtype = self.unet.dtype
        pooled = stored.get("pooled_prompt_embeds")
        return PromptEmbeddings(
            to_device(stored["prompt_embeds"], self.device, dtype),
            None if pooled is None else to_device(pooled, self.device, dtype),
        )

    def added_conditioning(self, batch: Batch, text: PromptEmbeddings) -> AddedConditioning | None:
        """The family's added conditioning for the batch (None where its UNet takes none)."""
        return self.family.added_conditioning(
            text, batch["original_size"], batch["crop_top_left"], batch["target_size"]
        )
