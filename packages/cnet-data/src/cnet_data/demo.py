"""`cnet-data demo`: a generated dataset through the whole data path, offline, in seconds."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader

from cnet_data.atomic import atomic_open
from cnet_data.batch import collate_samples
from cnet_data.bucket_report import bucket_rows, format_table, write_histogram
from cnet_data.buckets import BucketConfig, BucketTable
from cnet_data.dataset import AugmentConfig, ControlNetDataset
from cnet_data.index import DatasetIndex
from cnet_data.outdir import OutputPathError
from cnet_data.sampler import BucketBatchSampler
from cnet_data.scan import ScanConfig, scan
from cnet_data.sources import SourceConfig
from cnet_data.synthetic import write_fill_dataset

DEMO_BUCKETS = BucketConfig(area=64 * 64, min_side=32, max_side=128, step=16)
DEMO_ENTRIES = frozenset({"dataset", "index", "index.report.json", "buckets.png", "batch.png"})
"""What a demo folder holds: a rerun may overwrite these, and only into a folder of them."""


def run_demo(out: Path, *, samples: int = 48, batch_size: int = 4) -> None:
    """Generate, index, bucket and batch a small fill dataset; print where everything is."""
    out = Path(out)
    _check_demo_folder(out)
    manifest = write_fill_dataset(out / "dataset", samples)
    builder, report = scan(SourceConfig(manifest), ScanConfig(workers=1), progress=False)
    builder.write(out / "index", root=manifest.parent, extra={"scan": report.totals()})
    report.write(out / "index.report.json")
    print(report.summary())

    index = DatasetIndex(out / "index")
    table = BucketTable.from_config(DEMO_BUCKETS)
    rows = bucket_rows(index, table, global_batch=batch_size)
    print(format_table(rows))
    write_histogram(rows, out / "buckets.png")

    ids = table.assign(index.widths, index.heights)
    sampler = BucketBatchSampler(ids, batch_size, seed=0, bucket_log_aspects=table.log_aspects)
    dataset = ControlNetDataset(
        index, table, sampler.bucket_ids, augment=AugmentConfig(flip_probability=0.5)
    )
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=0, collate_fn=collate_samples)
    batch = next(iter(loader))
    print(
        f"{len(sampler)} batches per epoch; first batch: images {tuple(batch['image'].shape)}, "
        f"conditioning {tuple(batch['conditioning_image'].shape)}, "
        f"SDXL crop top-left {batch['crop_top_left'].tolist()}"
    )
    _write_preview(batch["image"], batch["conditioning_image"], out / "batch.png")
    print(f"index: {out / 'index'}\nhistogram: {out / 'buckets.png'}\npreview: {out / 'batch.png'}")


def _check_demo_folder(out: Path) -> None:
    """Refuse an existing folder that is not an earlier demo: the demo overwrites its files."""
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise OutputPathError(f"{out} is not a folder; the demo writes a folder there")
    if not out.exists():
        return
    foreign = sorted(
        name
        for name in os.listdir(out)
        if name not in DEMO_ENTRIES and not name.startswith(".index.cnet-")
    )
    if foreign:
        shown = ", ".join(foreign[:5]) + (" ..." if len(foreign) > 5 else "")
        raise OutputPathError(
            f"{out} holds files that are not a cnet-data demo's ({shown}); the demo would "
            "write its dataset among them"
        )


def _write_preview(images: torch.Tensor, conds: torch.Tensor, path: Path) -> None:
    """Images on the top row, their conditioning images below."""
    top = torch.cat(list((images + 1) * 127.5), dim=2)
    bottom = torch.cat(list(conds * 255), dim=2)
    grid = torch.cat([top, bottom], dim=1).clamp(0, 255).to(torch.uint8)
    picture = Image.fromarray(grid.permute(1, 2, 0).numpy())
    with atomic_open(path) as fh:
        picture.save(fh, format="PNG")
