"""`ControlNetModule`: the Lightning module that trains a ControlNet on a frozen base model.

Every random draw of a step (VAE latent sample, noise, timesteps, caption dropout) comes from a
generator seeded by (seed, global step, rank), not from the global RNG: a resumed run draws
exactly what an uninterrupted one would, with no RNG state in the checkpoint.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from typing_extensions import override

from cnet_data.captions import caption_key_hex
from cnet_data.embcache import EmbeddingCache
from cnet_models.controlled import AddedConditioning, ControlledUNet, make_controlnet, sdxl_time_ids
from cnet_models.facade import vae_encode_mean_and_sample
from cnet_models.loading import BaseModel, load_base_model
from cnet_models.noise import NoiseSchedule
from cnet_models.text import PromptEmbeddings
from cnet_train.config import TrainConfig
from cnet_train.config_io import config_to_dict
from cnet_train.data import ControlNetDataModule
from cnet_train.optim import build_optimizer, build_scheduler

Batch = Mapping[str, Any]
_EMPTY_KEY = caption_key_hex("")
"""The cache key of the empty prompt, which caption dropout swaps in."""
_CHECKPOINTED = ("controlnet.",)
"""Only the trainable ControlNet goes into checkpoints; the frozen parts reload from their
source (a folder or the hub)."""


class ControlNetModule(L.LightningModule):
    """Frozen UNet, VAE and text encoders; a trainable ControlNet; the diffusion loss."""

    def __init__(self, config: TrainConfig, base: BaseModel | None = None) -> None:
        super().__init__()
        self.config = config
        base = base if base is not None else load_base_model(config.model)
        self.family = base.family
        self.unet = base.unet
        self.vae = base.vae
        self.text_encoders = torch.nn.ModuleList(base.text_encoders)
        self.controlnet = make_controlnet(base.unet, config.controlnet)
        self.controlled = ControlledUNet(self.unet, self.controlnet)
        self.schedule = NoiseSchedule(base.scheduler)
        self.prompt_encoder = base.prompt_encoder()
        self.vae_scaling_factor = base.vae_scaling_factor
        self.base = base
        self.cache: EmbeddingCache | None = None
        # Frozen weights are not checkpointed, so loading must accept their absence.
        self.strict_loading = False

    # -- Lightning hooks -----------------------------------------------------------------------

    @override
    def setup(self, stage: str) -> None:
        path = self.config.cache.path
        if path is not None and self.cache is None:
            fingerprint = self.prompt_encoder.fingerprint(self.config.model.source)
            self.cache = EmbeddingCache(path, expected_fingerprint=fingerprint)

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
        self._shard_for_fsdp2()
        if self.config.trainer.compile:
            # In place: parameter names, and so checkpoints and exports, stay as they are.
            self.unet.compile()
            self.controlnet.compile()

    def _shard_for_fsdp2(self) -> None:
        mesh = self.device_mesh  # set by ModelParallelStrategy (trainer.strategy: fsdp)
        if mesh is None:
            return
        from torch.distributed.fsdp import fully_shard

        # FSDP2: shard the trainable ControlNet block by block; the frozen parts stay whole.
        dp_mesh = mesh["data_parallel"]
        for block in [*self.controlnet.down_blocks, self.controlnet.mid_block]:
            fully_shard(block, mesh=dp_mesh)
        fully_shard(self.controlnet, mesh=dp_mesh)

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("state_dict")
        if isinstance(state, dict):
            checkpoint["state_dict"] = {
                k: v for k, v in state.items() if k.startswith(_CHECKPOINTED)
            }
        # The resolved config and the ControlNet's architecture travel with the weights:
        # `cnet-train export` needs neither the YAML nor the base model.
        checkpoint["cnet_config"] = config_to_dict(self.config)
        checkpoint["cnet_controlnet_config"] = dict(self.controlnet.config)

    @override
    def on_train_epoch_start(self) -> None:
        data = self._datamodule()
        if data is not None:
            data.set_epoch(self.current_epoch)

    @override
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        data = self._datamodule()
        if data is not None:
            data.batch_started()

    def _datamodule(self) -> ControlNetDataModule | None:
        trainer = self._trainer
        data = getattr(trainer, "datamodule", None) if trainer is not None else None
        return data if isinstance(data, ControlNetDataModule) else None

    @override
    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        loss = self.loss(batch, self.global_step)
        self.log("train/loss", loss.detach(), prog_bar=True)
        return loss

    # -- the loss ------------------------------------------------------------------------------

    def step_generator(self, step: int) -> torch.Generator:
        """The generator of one step: a pure function of (seed, step, rank)."""
        seed = (self.config.seed * 1_000_003 + step) * 4099 + self.global_rank
        return torch.Generator(device=self.device).manual_seed(seed % (2**63))

    def loss(self, batch: Batch, step: int) -> torch.Tensor:
        """The (min-SNR weighted) diffusion loss of `batch`, with the draws of `step`."""
        g = self.step_generator(step)
        images = batch["image"]
        batch_size = images.shape[0]
        with torch.no_grad():
            latents = self.encode_images(images, g)
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
        prediction = self.controlled(
            noisy,
            timesteps,
            text.prompt_embeds,
            batch["conditioning_image"],
            conditioning_scale=self.config.loss.conditioning_scale,
            added=added,
        )
        per_sample = F.mse_loss(prediction.float(), target.float(), reduction="none")
        per_sample = per_sample.mean(dim=tuple(range(1, per_sample.ndim)))
        gamma = self.config.loss.min_snr_gamma
        if gamma is not None:
            per_sample = per_sample * self.schedule.min_snr_weights(timesteps, gamma)
        return per_sample.mean()

    def encode_images(self, images: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """Latents of images in [-1, 1], encoded on the fly (augmentation stays possible)."""
        latents = vae_encode_mean_and_sample(self.vae, images.to(self.vae.dtype), g)
        return latents.float() * self.vae_scaling_factor

    def condition(self, batch: Batch, g: torch.Generator) -> PromptEmbeddings:
        """Text conditioning, with captions dropped (drawn now, at every step) for CFG."""
        captions = list(batch["caption"])
        drop = torch.rand(len(captions), generator=g, device=self.device)
        dropped = (drop < self.config.data.caption_dropout).tolist()
        if self.cache is None:
            kept = ["" if d else c for c, d in zip(captions, dropped, strict=True)]
            return self.prompt_encoder.encode(kept)
        keys = [_EMPTY_KEY if d else k for k, d in zip(batch["caption_key"], dropped, strict=True)]
        stored = self.cache.get_many(keys)
        dtype = self.unet.dtype
        pooled = stored.get("pooled_prompt_embeds")
        return PromptEmbeddings(
            stored["prompt_embeds"].to(self.device, dtype),
            None if pooled is None else pooled.to(self.device, dtype),
        )

    def added_conditioning(self, batch: Batch, text: PromptEmbeddings) -> AddedConditioning | None:
        if not self.family.added_conditioning:
            return None
        if text.pooled_prompt_embeds is None:
            raise ValueError("SDXL conditioning needs the pooled prompt embedding")
        time_ids = sdxl_time_ids(
            batch["original_size"], batch["crop_top_left"], batch["target_size"]
        ).to(self.device)
        return AddedConditioning(text_embeds=text.pooled_prompt_embeds, time_ids=time_ids)
