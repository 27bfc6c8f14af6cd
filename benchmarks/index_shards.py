"""Indexing and random-access reads: tar shards next to the same samples as loose files.

Writes N synthetic samples (default 100k; 64 distinct small PNG pairs and captions, reused, so
writing is quick and the figures are about the reads) twice: as WebDataset-style shards of
`--per-shard` samples and as a folder of pairs. Then prints, for each:

- indexing: samples indexed per second, per core (`cnet-data`'s scan, header probes included;
  for the shards also with `verify: metadata`, sizes from each `KEY.json`, no image read),
  and the index's size on disk per sample;
- random access: samples read per second (image, conditioning and caption bytes) in a random
  order over the whole dataset, through the index's store, as the dataset reads them.

The shards are also read as an fsspec URL (`file://`, the local filesystem through fsspec):
each member one ranged read, without and with the read-through cache (filled by the scan), the
path a dataset on `s3://` takes, less the network.

    python benchmarks/index_shards.py [--samples 100000] [--per-shard 1000] [--workers 2]

The page cache is warm for both (the files were just written): this compares the reading
paths, not the disk.
"""

from __future__ import annotations

import argparse
import io
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from cnet_data.index import DatasetIndex
from cnet_data.scan import ScanConfig, ScanVerify, scan
from cnet_data.shard_writer import ShardWriter
from cnet_data.sources import SourceConfig

DISTINCT = 64


def _pngs(seed: int) -> list[bytes]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(DISTINCT):
        buffer = io.BytesIO()
        pixels = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(buffer, format="PNG")
        out.append(buffer.getvalue())
    return out


def write_both(root: Path, samples: int, per_shard: int) -> tuple[Path, Path]:
    images, conds = _pngs(0), _pngs(1)
    loose = root / "loose"
    for sub in ("images", "conditioning"):
        (loose / sub).mkdir(parents=True)
    with ShardWriter(root / "shards", samples_per_shard=per_shard) as writer:
        for i in range(samples):
            key, caption = f"{i:08d}", f"sample {i} of a benchmark".encode()
            image, cond = images[i % DISTINCT], conds[i % DISTINCT]
            meta = b'{"width": 64, "height": 64}'
            writer.add(key, {"png": image, "cond.png": cond, "txt": caption, "json": meta})
            (loose / "images" / f"{key}.png").write_bytes(image)
            (loose / "images" / f"{key}.txt").write_bytes(caption)
            (loose / "conditioning" / f"{key}.png").write_bytes(cond)
    return root / "shards", loose


def index_figures(
    source: SourceConfig, out: Path, workers: int, verify: ScanVerify
) -> tuple[float, float]:
    """(samples indexed per second per core, index bytes per sample)."""
    start = time.perf_counter()
    config = ScanConfig(workers=workers, verify=verify)
    builder, report = scan(source, config, progress=False)
    builder.write(out)
    seconds = time.perf_counter() - start
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    return report.accepted / seconds / workers, size / report.accepted


def reads_per_second(index: DatasetIndex, reads: int) -> float:
    order = np.random.default_rng(0).permutation(len(index))[:reads]
    store = index.store
    start = time.perf_counter()
    for i in order:
        entry = index[int(i)]
        for reference in (entry.image, entry.conditioning):
            with store.open(reference) as fh:
                fh.read()
        index.caption(int(i))
    return len(order) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=100_000)
    parser.add_argument("--per-shard", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--reads", type=int, default=20_000, help="random reads to time")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        start = time.perf_counter()
        shards, loose = write_both(root, args.samples, args.per_shard)
        print(f"wrote {args.samples} samples both ways in {time.perf_counter() - start:.0f} s")
        runs: list[tuple[str, SourceConfig, ScanVerify]] = [
            ("tar shards", SourceConfig(shards), "header"),
            ("tar, json", SourceConfig(shards), "metadata"),
            ("loose files", SourceConfig(loose, format="folder"), "header"),
            ("fsspec", SourceConfig(root / "kept", url=f"file://{shards}"), "header"),
            (
                "fsspec+cache",
                SourceConfig(root / "kept-c", url=f"file://{shards}", read_cache_gib=8.0),
                "header",
            ),
        ]
        for name, source, verify in runs:
            out = root / f"index-{name.replace(' ', '-').replace(',', '').replace('+', '-')}"
            rate, per_sample = index_figures(source, out, args.workers, verify)
            reads = reads_per_second(DatasetIndex(out), args.reads)
            print(
                f"{name:12s} indexed {rate:8.0f} samples/s per core ({args.workers} workers), "
                f"index {per_sample:6.1f} B/sample; random reads {reads:8.0f} samples/s"
            )


if __name__ == "__main__":
    main()
