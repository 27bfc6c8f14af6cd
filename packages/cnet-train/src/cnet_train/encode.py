"""`cnet-train encode`: the latent cache of a dataset (`latents.path`).

Run once before training, alone or under torchrun (the batches are shared out by rank). Each
sample is loaded exactly as training loads it (the same index, buckets, crop and flip of each
variant), encoded by the run's VAE on this machine's device, and its moments stored in its
bucket's cache. Resumable: batches whose samples are all stored are skipped.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from cnet_data.batch import collate_samples
from cnet_data.buckets import BucketTable
from cnet_data.dataset import ControlNetDataset
from cnet_data.embcache import EmbeddingCacheWriter, finalize
from cnet_models.facade import AutoencoderKL, vae_moments
from cnet_models.loading import load_base_model
from cnet_train.config import TrainConfig
from cnet_train.data import ControlNetDataModule
from cnet_train.embed import barrier, compute_device, rank_and_world
from cnet_train.latent_cache import (
    FIELD,
    bucket_fingerprint,
    bucket_folder,
    fingerprint,
    latent_fields,
    sample_key,
    variant_count,
)
from cnet_train.precision_auto import settle_here

SHARD_BYTES = 256 * 2**20
"""Records a bucket's writer holds before it writes a shard (SDXL at 1024 px: 512 of 512 KiB)."""


def encode_latents(config: TrainConfig, vae: AutoencoderKL | None = None) -> int:
    """Encode every (sample, variant) not yet in the cache; returns how many this rank added.
    `vae` replaces loading the base model's (a VAE built in memory, e.g. for a benchmark)."""
    root = config.latents.path
    if root is None:
        raise ValueError("latents.path is not set: say where the latent cache goes")
    # The VAE's dtype the run on this machine encodes in (a `vae` given brings its own).
    config = settle_here(config, frozen=None if vae is None else vae.dtype)
    rank, world = rank_and_world()
    data = ControlNetDataModule(config)
    if rank == 0:
        data.prepare_data()  # one rank builds a missing index; the others wait for it
    barrier()
    data.setup("fit")
    dataset = data.dataset
    assert dataset is not None
    vae = vae if vae is not None else load_base_model(config.model).vae
    module: torch.nn.Module = vae  # diffusers' `to` wrapper is not callable for mypy
    module.to(compute_device())
    base = fingerprint(vae, dataset.index, dataset.table, config.data.augment, config.seed)
    writers = _Writers(root, vae, base, dataset.table, rank)
    added = 0
    try:
        for variant in range(variant_count(config.data.augment)):
            dataset.set_epoch(variant)  # variant v is drawn as epoch v is
            added += _encode_variant(config, dataset, vae, writers, variant=variant, world=world)
    finally:
        writers.close()
    barrier()
    if rank == 0:
        for bucket in np.unique(dataset.bucket_ids):
            finalize(bucket_folder(root, int(bucket)))
    return added


class _Writers:
    """One cache writer per bucket, opened when the bucket is first met."""

    def __init__(
        self,
        root: Path,
        vae: AutoencoderKL,
        base: dict[str, Any],
        table: BucketTable,
        rank: int,
    ) -> None:
        self.root, self.vae, self.base, self.table, self.rank = root, vae, base, table, rank
        self._open: dict[int, EmbeddingCacheWriter] = {}

    def __call__(self, bucket: int) -> EmbeddingCacheWriter:
        if bucket not in self._open:
            b = self.table[bucket]
            fields = latent_fields(self.vae, b.height, b.width)
            self._open[bucket] = EmbeddingCacheWriter(
                bucket_folder(self.root, bucket),
                fingerprint=bucket_fingerprint(self.base, self.table, bucket),
                fields=fields,
                rank=self.rank,
                shard_records=max(1, SHARD_BYTES // fields[0].nbytes),
            )
        return self._open[bucket]

    def close(self, bucket: int | None = None) -> None:
        """Write out one bucket's last records (every bucket's without `bucket`)."""
        for key in [bucket] if bucket is not None else list(self._open):
            writer = self._open.pop(key, None)
            if writer is not None:
                writer.close()


def _encode_variant(
    config: TrainConfig,
    dataset: ControlNetDataset,
    vae: AutoencoderKL,
    writers: _Writers,
    *,
    variant: int,
    world: int,
) -> int:
    """Encode this rank's share of the samples' `variant` that the cache lacks."""
    batches = list(_batches(dataset.bucket_ids, config.latents.batch_size))[writers.rank :: world]
    todo = [
        b
        for b in batches
        if writers(int(dataset.bucket_ids[b[0]])).missing([sample_key(i, variant) for i in b])
    ]
    loader = DataLoader(
        dataset,
        batch_sampler=todo,
        collate_fn=collate_samples,
        num_workers=config.data.num_workers,
    )
    added = 0
    current: int | None = None
    for batch in tqdm(loader, desc=f"encoding variant {variant}", disable=writers.rank != 0):
        bucket = int(batch["bucket"][0])
        if bucket != current and current is not None:
            writers.close(current)  # batches come bucket by bucket: this one is done
        current = bucket
        with torch.no_grad():
            moments = vae_moments(vae, batch["image"].to(vae.device, vae.dtype))
        # The index of each sample loaded (a broken file is replaced by its bucket's next).
        keys = [sample_key(int(i), variant) for i in batch["index"]]
        added += writers(bucket).add(keys, {FIELD: moments.cpu()})
    return added


def _batches(bucket_ids: npt.NDArray[np.int64], size: int) -> Iterator[list[int]]:
    """Samples of one bucket at a time, in index order, `size` at most per batch."""
    for bucket in np.unique(bucket_ids):
        members = np.flatnonzero(bucket_ids == bucket).tolist()
        for start in range(0, len(members), size):
            yield members[start : start + size]
