"""One rank of the two-process gloo test (run by test_distributed.py, not collected by pytest).

Usage: python distributed_worker.py INDEX_DIR OUT_JSON, with RANK, WORLD_SIZE, MASTER_ADDR and
MASTER_PORT set. Each rank loads the index, builds the sampler without telling it its rank (it
must read torch.distributed), iterates a DataLoader for two epochs, and rank 0 writes what every
rank saw.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch.distributed as dist
from torch.utils.data import DataLoader

from cnet_data.buckets import BucketConfig, BucketTable
from cnet_data.dataset import ControlNetDataset
from cnet_data.index import DatasetIndex
from cnet_data.sampler import BucketBatchSampler


def main(index_dir: Path, out: Path) -> None:
    dist.init_process_group("gloo")
    index = DatasetIndex(index_dir)
    table = BucketTable.from_config(BucketConfig(area=64 * 64, min_side=32, max_side=128, step=16))
    ids = table.assign(index.widths, index.heights)
    sampler = BucketBatchSampler(ids, 2, seed=3, bucket_log_aspects=table.log_aspects)
    dataset = ControlNetDataset(index, table, sampler.bucket_ids)
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=1)
    mine = []
    for epoch in range(2):
        sampler.set_epoch(epoch)
        batches = [
            {"indices": b["index"].tolist(), "shape": list(b["image"].shape)} for b in loader
        ]
        mine.append({"len": len(loader), "batches": batches})
    gathered: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, {"rank": dist.get_rank(), "epochs": mine})
    if dist.get_rank() == 0:
        out.write_text(json.dumps({"ranks": gathered, "bucket_ids": sampler.bucket_ids.tolist()}))
    dist.destroy_process_group()
    # Results are on disk; skip interpreter teardown, where a gloo thread still being torn
    # down occasionally aborts the process ("terminate called without an active exception").
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
