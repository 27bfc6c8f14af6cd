"""What `cnet-data buckets` shows: samples per bucket, merges, and a histogram picture."""

from __future__ import annotations

from pathlib import Path

import attrs
import numpy as np
from PIL import Image, ImageDraw

from cnet_data.atomic import atomic_open
from cnet_data.buckets import BucketTable, merge_small_buckets
from cnet_data.index import DatasetIndex


@attrs.frozen
class BucketRow:
    bucket: int
    width: int
    height: int
    count: int
    """Samples assigned by aspect ratio."""
    merged_into: int | None
    """Where a bucket too small for one global batch goes, if a global batch size was given."""


def bucket_rows(
    index: DatasetIndex, table: BucketTable, *, global_batch: int = 0
) -> list[BucketRow]:
    """One row per bucket that has samples, ordered by aspect ratio."""
    ids = table.assign(index.widths, index.heights)
    counts = np.bincount(ids, minlength=len(table))
    merges: dict[int, int] = {}
    if global_batch > 0 and ids.size:
        _, merges = merge_small_buckets(ids, global_batch, table.log_aspects)
    return [
        BucketRow(b, table[b].width, table[b].height, int(counts[b]), merges.get(b))
        for b in range(len(table))
        if counts[b]
    ]


def format_table(rows: list[BucketRow]) -> str:
    total = sum(r.count for r in rows) or 1
    lines = [f"{'bucket':>6} {'size':>11} {'aspect':>7} {'samples':>8} {'share':>6}  merged into"]
    for r in rows:
        merged = "" if r.merged_into is None else str(r.merged_into)
        lines.append(
            f"{r.bucket:>6} {f'{r.width}x{r.height}':>11} {r.width / r.height:>7.3f} "
            f"{r.count:>8} {100 * r.count / total:>5.1f}%  {merged}"
        )
    lines.append(f"{len(rows)} populated buckets, {sum(r.count for r in rows)} samples")
    return "\n".join(lines)


def write_histogram(rows: list[BucketRow], path: Path) -> None:
    """A bar per populated bucket, labelled with its size; written atomically as PNG."""
    bar, gap, height, label_h = 28, 8, 240, 70
    width = max(320, len(rows) * (bar + gap) + gap)
    img = Image.new("RGB", (width, height + label_h), "white")
    draw = ImageDraw.Draw(img)
    peak = max((r.count for r in rows), default=1)
    for i, r in enumerate(rows):
        x = gap + i * (bar + gap)
        top = height - int((height - 20) * r.count / peak)
        draw.rectangle((x, top, x + bar, height), fill=(60, 110, 200))
        draw.text((x, top - 12), str(r.count), fill="black")
        draw.text((x, height + 4), str(r.width), fill="black")
        draw.text((x, height + 16), f"x{r.height}", fill="black")
    draw.text((gap, height + 40), "samples per bucket (width x height)", fill="black")
    with atomic_open(Path(path)) as fh:
        img.save(fh, format="PNG")
