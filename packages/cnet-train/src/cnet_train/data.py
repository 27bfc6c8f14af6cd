"""`ControlNetDataModule`: index, bucket sampler, dataset and loader, resumable mid-epoch.

Lightning runs with `use_distributed_sampler=False`: the bucket sampler is rank-aware by itself.
The module builds the sampler and dataset and can save and restore their position
(`position`, `restore_position`); the run's progress through them (its epoch and the batches
the training loop has consumed, which a loader with workers draws ahead of) is kept by
`cnet_train.callbacks.data_progress.DataProgress`, which saves it under a stable key, so a
resumed run continues with exactly the batches it had not seen.

The bucket table is `data.buckets` over the base model family's defaults (`run_buckets`), found
by the functions `cnet-data buckets --config RUN.yaml` uses, so that the two show one table.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
from torch.utils.data import DataLoader
from typing_extensions import override

from cnet_data.batch import collate_samples
from cnet_data.buckets import BucketTable
from cnet_data.dataset import ControlNetDataset
from cnet_data.epoch_tagged import EpochTagged
from cnet_data.index import INDEX_OWNERSHIP, DatasetIndex, is_older_index
from cnet_data.outdir import claim_directory
from cnet_data.run_config import ResolvedBuckets
from cnet_data.run_config import run_buckets as _run_buckets
from cnet_data.sampler import BucketBatchSampler
from cnet_data.scan import scan
from cnet_train.config import TrainConfig

logger = logging.getLogger(__name__)


def index_path(config: TrainConfig) -> Path:
    return config.data.index or config.run_dir / "index"


def run_buckets(config: TrainConfig) -> ResolvedBuckets:
    """The run's bucket settings: the keys `data.buckets` sets, the rest from the family that
    `model.family` names or the local model folder's UNet config shows (a relative folder is
    relative to the current directory, as for loading it), else `BucketConfig`'s (SDXL's), and
    where the area came from. Raises `RunConfigError` (a `CnetError`) when the keys set do not
    make a table with those defaults; the preflight reports that before the launch."""
    return _run_buckets(config.data.buckets, config.model.described_by, config.model.family)


def ensure_index(config: TrainConfig) -> Path:
    """The dataset index, built (and its report written) if it does not exist yet, or
    rebuilt if an older cnet-data wrote it (its format cannot be read any more)."""
    path = index_path(config)
    older = is_older_index(path)
    if (path / "index.json").is_file() and not older:
        return path
    if older:
        logger.warning("index %s is of an older format; indexing the dataset again", path)
    # Refuse a target that is not an index before scanning, not after.
    claim_directory(path, INDEX_OWNERSHIP)
    logger.info("indexing %s into %s", config.data.source.path, path)
    builder, report = scan(config.data.source, config.data.scan)
    builder.write(path, root=config.data.source.root, extra={"scan": report.totals()})
    report.write(path.with_name(path.name + ".report.json"))
    logger.info("%s", report.summary())
    return path


class ControlNetDataModule(L.LightningDataModule):
    """The training data of one run, for one rank."""

    def __init__(self, config: TrainConfig) -> None:
        super().__init__()
        self.config = config
        # One rank builds the index; on a shared filesystem several would race.
        self.prepare_data_per_node = False
        self.sampler: BucketBatchSampler | None = None
        self.dataset: ControlNetDataset | None = None
        self.buckets: ResolvedBuckets | None = None
        """The bucket settings `setup` built the table from, and where their area came from."""

    @override
    def prepare_data(self) -> None:
        ensure_index(self.config)

    @override
    def setup(self, stage: str) -> None:
        if self.sampler is not None:
            return
        data = self.config.data
        index = DatasetIndex(ensure_index(self.config))
        if len(index) == 0:
            raise ValueError(f"the dataset index {index.directory} holds no samples")
        self.buckets = run_buckets(self.config)
        table = BucketTable.from_config(self.buckets.config)
        world, rank = self._world()
        self.sampler = BucketBatchSampler(
            table.assign(index.widths, index.heights),
            data.batch_size,
            seed=self.config.seed,
            num_replicas=world,
            rank=rank,
            bucket_log_aspects=table.log_aspects,
        )
        if len(self.sampler) == 0:
            raise ValueError(
                f"no full batch: {len(index)} samples cannot fill one global batch of "
                f"{data.batch_size} x {world}; lower data.batch_size or add samples"
            )
        self.dataset = ControlNetDataset(
            index, table, self.sampler.bucket_ids, augment=data.augment, seed=self.config.seed
        )

    def _world(self) -> tuple[int, int]:
        trainer = self.trainer
        if trainer is None:
            return 1, 0
        return trainer.world_size, trainer.global_rank

    @override
    def train_dataloader(self) -> DataLoader[Any]:
        if self.dataset is None or self.sampler is None:
            raise RuntimeError("ControlNetDataModule.setup() has not run")
        data = self.config.data
        workers = data.num_workers
        return DataLoader(
            self.dataset,
            # The epoch travels with the indices: persistent workers never see a set_epoch.
            batch_sampler=EpochTagged(self.sampler),
            collate_fn=collate_samples,
            num_workers=workers,
            pin_memory=data.pin_memory and self._on_gpu(),
            prefetch_factor=data.prefetch_factor if workers else None,
            # Workers (each with its decoders, file handles and the index's mapped columns)
            # start once per run, not at every epoch: short epochs of large buckets would
            # otherwise wait for workers to start at every epoch boundary.
            persistent_workers=workers > 0,
        )

    def _on_gpu(self) -> bool:
        trainer = self.trainer
        return trainer is not None and trainer.strategy.root_device.type == "cuda"

    @property
    def ready(self) -> bool:
        """Whether `setup` has built the sampler and the dataset."""
        return self.sampler is not None and self.dataset is not None

    def set_epoch(self, epoch: int) -> None:
        """Draw the order (and the crops) of pass `epoch`, before its loader is iterated."""
        if self.sampler is None or self.dataset is None:
            return
        self.sampler.set_epoch(epoch)
        self.dataset.set_epoch(epoch)

    def position(self, consumed: int) -> dict[str, Any]:
        """What a checkpoint stores of the data: the sampler's place after `consumed` batches
        of the current epoch (empty before `setup`)."""
        if self.sampler is None:
            return {}
        return {"sampler": self.sampler.state_dict(consumed_batches=consumed)}

    def restore_position(self, state: Mapping[str, Any]) -> int:
        """Continue where `state` (from `position`) left off; return the epoch that continues.

        Saved at the last batch of an epoch, what is left to see is the next epoch: Lightning
        restarts such a run in the next epoch without an `on_train_epoch_start` for it, so the
        next epoch's order is drawn here."""
        if self.sampler is None or self.dataset is None:
            raise RuntimeError("ControlNetDataModule.setup() has not run")
        self.sampler.load_state_dict(state["sampler"])
        epoch = self.sampler.epoch
        if self.sampler.remaining() == 0:
            epoch += 1
            self.sampler.set_epoch(epoch)
        self.dataset.set_epoch(epoch)
        return epoch
