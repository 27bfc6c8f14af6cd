"""The latent cache: each sample's VAE latent distribution, per augmentation variant, stored
by `cnet-train encode` and read by the training step instead of running the VAE.

One embedding-cache directory (`cnet_data.embcache`: memory-mapped, fixed-size records,
resumable, one O(1) lookup table) per bucket, `bucket-NNN`, because a bucket fixes the latent
shape. A record is the encoder's moments (means, then log-variances) in the VAE's dtype, keyed
by (sample index, variant); the step draws its latent sample from them with its own generator,
so the training draws stay those of on-the-fly encoding.

Every bucket's header carries the fingerprint of what the latents depend on: the VAE (its
config and a sample of its weights), the dataset index (sizes and image references), the bucket
table, and the augmentation (seed, crop, flip, resample, variants). A cache that differs in any
of them is refused when the run starts, with what differs.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cnet_data.batch import Batch
from cnet_data.buckets import BucketTable
from cnet_data.dataset import AugmentConfig, ControlNetDataset
from cnet_data.embcache import EmbeddingCache, FieldSpec
from cnet_data.embcache.header import fingerprint_differences, read_header
from cnet_data.errors import CnetError
from cnet_data.index import DatasetIndex
from cnet_models.facade import AutoencoderKL
from cnet_train.config import TrainConfig

logger = logging.getLogger(__name__)

FIELD = "moments"
ENCODE_HINT = "run `cnet-train encode CONFIG` to (re)build it, or set latents.path to null"


class LatentCacheError(CnetError):
    """The latent cache is missing a bucket or sample, or was built for something else."""


def sample_key(index: int, variant: int) -> str:
    """The record key of sample `index`'s augmentation `variant` (32 hex digits)."""
    return f"{index:016x}{variant:016x}"


def variant_count(augment: AugmentConfig) -> int:
    """How many variants of each sample a cache holds for `augment`."""
    return 1 if augment.fixed else augment.variants


def bucket_folder(root: Path, bucket: int) -> Path:
    return root / f"bucket-{bucket:03d}"


def latent_fields(vae: AutoencoderKL, height: int, width: int) -> list[FieldSpec]:
    factor = 2 ** (len(vae.config["block_out_channels"]) - 1)
    channels = 2 * int(vae.config["latent_channels"])
    dtype = str(vae.dtype).removeprefix("torch.")
    return [FieldSpec(FIELD, (channels, height // factor, width // factor), dtype)]


def fingerprint(
    vae: AutoencoderKL, index: DatasetIndex, table: BucketTable, augment: AugmentConfig, seed: int
) -> dict[str, Any]:
    """What every bucket's latents depend on (the bucket's own size is added per bucket)."""
    return {
        "vae": _vae_digest(vae),
        "dtype": str(vae.dtype).removeprefix("torch."),
        "dataset": _index_digest(index),
        "buckets": [[b.height, b.width] for b in table.buckets],
        "augment": {
            "seed": None if augment.fixed else seed,  # a fixed augmentation draws nothing
            "random_crop": augment.random_crop,
            "flip_probability": augment.flip_probability,
            "resample": augment.resample,
            "variants": variant_count(augment),
        },
    }


def bucket_fingerprint(base: dict[str, Any], table: BucketTable, bucket: int) -> dict[str, Any]:
    b = table[bucket]
    return {**base, "bucket": [bucket, b.height, b.width]}


class LatentCache:
    """The run's latent cache, opened (and checked) bucket by bucket."""

    def __init__(
        self, root: Path, base: dict[str, Any], table: BucketTable, buckets: list[int]
    ) -> None:
        self.root = root
        self._caches = {b: _open(root, bucket_fingerprint(base, table, b), b) for b in buckets}

    def moments(self, batch: Batch) -> torch.Tensor | None:
        """The stored moments of `batch`'s samples (a host batch: reading its indices waits
        for no device); None, with a warning, when the cache lacks one of them (a file that
        failed to decode at encode time and was replaced there): the step then encodes the
        batch itself, so that one rank does not stop while the others wait for it."""
        bucket = int(batch["bucket"][0])  # a sampler's batch is one bucket
        indices = batch["index"].tolist()  # host tensors from the loader: no device sync
        variants = batch["variant"].tolist()
        keys = [sample_key(i, v) for i, v in zip(indices, variants, strict=True)]
        cache = self._caches[bucket]
        try:
            return cache.get_many(keys)[FIELD]
        except KeyError as missing:
            logger.warning(
                "latents.path %s: bucket %d lacks a sample of this batch (%s); the VAE encodes "
                "it in the step. Rerun `cnet-train encode` to complete the cache",
                self.root,
                bucket,
                missing,
            )
            return None


def _open(root: Path, expected: dict[str, Any], bucket: int) -> EmbeddingCache:
    folder = bucket_folder(root, bucket)
    if not (folder / "header.json").is_file():
        raise LatentCacheError(
            f"latents.path {root} has no latents for bucket {bucket} "
            f"({expected['bucket'][1]}x{expected['bucket'][2]}); {ENCODE_HINT}"
        )
    if diffs := fingerprint_differences(expected, read_header(folder).fingerprint):
        raise LatentCacheError(
            f"latents.path {root}: bucket {bucket} was encoded for something else: "
            f"{'; '.join(diffs)} (expected != cache); {ENCODE_HINT}"
        )
    return EmbeddingCache(folder)


def _vae_digest(vae: AutoencoderKL) -> str:
    digest = hashlib.blake2b(digest_size=8)
    config = {k: v for k, v in dict(vae.config).items() if not k.startswith("_")}
    digest.update(json.dumps(config, sort_keys=True, default=str).encode())
    params = list(vae.parameters())
    for param in (params[0], params[len(params) // 2], params[-1]):
        digest.update(param.detach().flatten()[:4096].to("cpu", torch.float32).numpy().tobytes())
    return digest.hexdigest()


INDEX_FILES = ("sizes.npy", "images.bin", "images.offsets.npy")
"""The index's files that say which image each sample is, and its size (read whole: fast)."""


def _index_digest(index: DatasetIndex) -> str:
    digest = hashlib.blake2b(digest_size=8)
    for name in INDEX_FILES:
        digest.update((index.directory / name).read_bytes())
    return digest.hexdigest()


def open_latent_cache(
    config: TrainConfig, vae: AutoencoderKL, dataset: ControlNetDataset
) -> LatentCache:
    """The run's latent cache, each of the run's buckets checked against this run."""
    assert config.latents.path is not None
    base = fingerprint(vae, dataset.index, dataset.table, config.data.augment, config.seed)
    buckets = sorted(int(b) for b in np.unique(dataset.bucket_ids))
    return LatentCache(config.latents.path, base, dataset.table, buckets)
