"""Validation grids from the real diffusers ControlNet pipeline, to PNG and TensorBoard.

The fixed (prompt, conditioning image) pairs are split over the ranks, each rank renders its
share, and rank 0 assembles the grid: no rank idles in a collective while another renders all.
Every rank renders the same number of images (a rank short of prompts renders a padding copy it
then drops) and every rank gathers exactly once per validation: a sharded ControlNet (FSDP2,
ZeRO-3) gathers its weights in every forward, so unequal work would be a collective mismatch.
Every rank also remembers the step it validated, so the end of training skips (or repeats) the
validation on all ranks alike.

Each image is generated at the bucket training would use for its conditioning image (the
nearest in aspect ratio in the table of `data.buckets`, scaled to `validation.resolution`
squared pixels when that is set), and the conditioning image is centre-cropped to that
bucket, as the validation crop of the dataset does: nothing is squeezed to a square. The grid
shows each conditioning image above its result, with the prompt written under them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from typing_extensions import override

from cnet_data.buckets import Bucket, BucketConfig, BucketTable
from cnet_data.geometry import plan_crop
from cnet_models.pipelines import controlnet_pipeline, generate
from cnet_train.callbacks.base import AfterBatch
from cnet_train.config import ValidationConfig
from cnet_train.loggers import log_image
from cnet_train.module import ControlNetModule
from cnet_train.plots import labelled_grid, save_png
from cnet_train.summary import say


class ValidationCallback(AfterBatch):
    def __init__(
        self, run_dir: Path, config: ValidationConfig, buckets: BucketConfig | None = None
    ) -> None:
        self.run_dir = run_dir
        self.config = config
        self.table = validation_buckets(buckets or BucketConfig(), config.resolution)
        """Where each image's size comes from: the training buckets (maybe rescaled)."""
        self.last_grid: Path | None = None
        """The newest grid (on rank 0; the other ranks know its path but do not write it)."""
        self.last_step: int | None = None
        """The step of the newest validation, on every rank."""

    @override
    def after_batch(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any
    ) -> None:
        every = self.config.every_n_steps
        if every and trainer.global_step and trainer.global_step % every == 0:
            self.validate(trainer, pl_module)

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        step = trainer.global_step
        if not self.config.prompts or self.last_step == step:
            return
        # A relaunch after a kill at the end finds the grid already drawn: rank 0's view
        # decides for all ranks, since rendering is collective under sharding.
        drawn = self._grid_path(step).is_file() if trainer.is_global_zero else False
        if trainer.strategy.broadcast(drawn, src=0):
            self.last_step = step
            return
        self.validate(trainer, pl_module)

    def _grid_path(self, step: int) -> Path:
        return self.run_dir / "validation" / f"step-{step:08d}.png"

    def validate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> Path | None:
        if not self.config.prompts or not isinstance(pl_module, ControlNetModule):
            return None
        count, rank, world = len(self.config.prompts), trainer.global_rank, trainer.world_size
        own = list(range(rank, count, world))  # every world-size-th prompt
        mine = padded(own, -(-count // world))
        controls = [self._control(i) for i in mine]
        was_training = pl_module.controlnet.training
        pl_module.controlnet.eval()
        try:
            with pl_module.base.text_encoders_on(pl_module.device):
                images = self._render(pl_module, mine, controls)
        finally:
            pl_module.controlnet.train(was_training)
        rendered = _gather([(i, np.asarray(im)) for i, im in zip(own, images, strict=False)])
        self.last_step = trainer.global_step
        if not trainer.is_global_zero:
            return None
        by_index = dict(rendered)
        order = range(count)
        columns = [[self._control(i), Image.fromarray(by_index[i])] for i in order]
        grid = labelled_grid(columns, self.config.prompts)
        path = self._grid_path(trainer.global_step)
        save_png(grid, path)
        self.last_grid = path
        log_image(trainer, "validation", grid, trainer.global_step)
        say(f"validation at step {trainer.global_step}: {count} images -> {path}")
        return path

    def _render(
        self, module: ControlNetModule, mine: list[int], controls: list[Image.Image]
    ) -> list[Image.Image]:
        pipe = controlnet_pipeline(module.base, module.controlnet, zeros=module.zero_unconditional)
        # The ControlNet is float32, the frozen parts may be half precision: autocast to the
        # UNet's dtype lets both meet, as the dtype-matched pipeline would at inference. Under
        # FSDP2's mixed precision the ControlNet's gathered weights are half precision too.
        frozen = module.unet.dtype
        half = frozen if frozen != torch.float32 else module.gathered_dtype
        with torch.autocast(module.device.type, dtype=half, enabled=half is not None):
            return generate(
                pipe,
                [self.config.prompts[i] for i in mine],
                controls,
                sizes=[im.size for im in controls],
                steps=self.config.num_inference_steps,
                guidance_scale=self.config.guidance_scale,
                seeds=[self.config.seed + i for i in mine],
            )

    def _control(self, i: int) -> Image.Image:
        """Conditioning image `i` centre-cropped and resized to its bucket: what the pipeline
        is given, and what the grid shows above the result."""
        image = Image.open(self.config.images[i]).convert("RGB")
        bucket = self.table[int(self.table.assign([image.width], [image.height])[0])]
        plan = plan_crop((image.height, image.width), bucket, rng=None)
        size = (bucket.width, bucket.height)
        return image.resize(size, Image.Resampling.BILINEAR, box=plan.source_box())


def validation_buckets(buckets: BucketConfig, resolution: int | None) -> BucketTable:
    """The buckets of validation images: those of `buckets`, or, with `resolution`, the same
    shapes scaled to about `resolution` squared pixels (sides multiples of 8, what the VAE
    needs)."""
    table = BucketTable.from_config(buckets)
    if resolution is None:
        return table
    scale = resolution / buckets.area**0.5
    scaled = {(_side(b.width * scale), _side(b.height * scale)) for b in table.buckets}
    return BucketTable(sorted((Bucket(w, h) for w, h in scaled), key=lambda b: b.aspect))


def _side(length: float) -> int:
    return max(8, round(length / 8) * 8)


def padded(own: list[int], per_rank: int) -> list[int]:
    """A rank's prompt indices padded to `per_rank` (the same on every rank) by repeating its
    last one, or prompt 0 for a rank with none: the padding is rendered, to keep the
    collectives in step, and dropped."""
    return own + [own[-1] if own else 0] * (per_rank - len(own))


def _gather(items: list[tuple[int, np.ndarray]]) -> list[tuple[int, np.ndarray]]:
    if not (dist.is_available() and dist.is_initialized()):
        return items
    gathered: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, items)
    return [item for part in gathered if isinstance(part, list) for item in part]
