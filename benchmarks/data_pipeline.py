"""Image + conditioning pairs per second per core: cnet's dataset against a plain-PIL baseline.

Sources are large JPEGs (default 3000x2000) going into the 1024x1024-area bucket table. Both
pipelines run in this one process on one thread, over the same files, and both end in
normalised float tensors (image in [-1, 1], condition in [0, 1]):
- baseline: open, convert to RGB, resize the shorter side to 1024 (bilinear, cnet's default
  filter), centre-crop 1024x1024, for image and condition;
- cnet: `ControlNetDataset.__getitem__` (JPEG DCT-domain downscaling, resize of the crop box
  only, random crop to the nearest-aspect bucket, SDXL size values).

    python benchmarks/data_pipeline.py [--pairs 12] [--rounds 3] [--size 3000x2000]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cnet_data.buckets import BucketConfig, BucketTable
from cnet_data.dataset import ControlNetDataset
from cnet_data.index import DatasetIndex
from cnet_data.local_files import LocalFiles
from cnet_data.scan import ScanConfig, scan
from cnet_data.sources import SourceConfig

TARGET_RATIO = 2.0


def write_sources(root: Path, pairs: int, width: int, height: int) -> Path:
    """Photo-like JPEGs and edge-map-like conditions.

    Smooth gradients, a fine texture (detail at several scales, as in foliage or fabric) and
    sensor-like noise of sigma 4: pure Gaussian noise of large sigma would make Huffman
    decoding dominate, which no photograph does, and hide what DCT-domain scaling saves.
    """
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    lines = []
    for i in range(pairs):
        phase = rng.uniform(0, 6.28, size=3)
        base = np.stack(
            [127 + 100 * np.sin(xx / (200 + 40 * c) + yy / 300 + phase[c]) for c in range(3)], -1
        )
        texture = 12 * np.sin(xx / 3.1 + phase[0]) * np.cos(yy / 4.7 + phase[1])
        noise = rng.normal(0, 4, base.shape)
        noisy = np.clip(base + texture[..., None] + noise, 0, 255).astype(np.uint8)
        Image.fromarray(noisy).save(root / f"{i}.jpg", quality=92)
        edges = ((np.abs(np.sin(xx / 97 + i) * np.cos(yy / 61)) > 0.97) * 255).astype(np.uint8)
        Image.fromarray(edges).convert("RGB").save(root / f"{i}_c.jpg", quality=92)
        lines.append(f'{{"image": "{i}.jpg", "conditioning_image": "{i}_c.jpg", "text": "p{i}"}}')
    (root / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    return root / "manifest.jsonl"


def baseline_pair(image: Path, cond: Path, side: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    def load(path: Path) -> torch.Tensor:
        with Image.open(path) as img:
            rgb = img.convert("RGB")
        w, h = rgb.size
        scale = side / min(w, h)
        resized = rgb.resize((round(w * scale), round(h * scale)), Image.Resampling.BILINEAR)
        left, top = (resized.width - side) // 2, (resized.height - side) // 2
        crop = resized.crop((left, top, left + side, top + side))
        return torch.from_numpy(np.asarray(crop).copy()).permute(2, 0, 1).contiguous().float()

    return load(image).mul_(2 / 255).sub_(1), load(cond).mul_(1 / 255)


def rate(fn: Callable[[int], object], pairs: int, rounds: int) -> float:
    fn(0)  # warm-up: imports, allocator
    start = time.perf_counter()
    for _ in range(rounds):
        for i in range(pairs):
            fn(i)
    return rounds * pairs / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--size", default="3000x2000", help="source WIDTHxHEIGHT")
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.split("x"))
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        manifest = write_sources(root, args.pairs, width, height)
        builder, _ = scan(SourceConfig(manifest), ScanConfig(workers=1), progress=False)
        builder.write(root / "index", root=root)
        index = DatasetIndex(root / "index")
        table = BucketTable.from_config(BucketConfig())
        ids = table.assign(index.widths, index.heights)
        dataset = ControlNetDataset(index, table, ids)
        sample = dataset[0]
        bucket = table[int(ids[0])]
        files = LocalFiles(root)  # the baseline reads the same files by path
        base = rate(
            lambda i: baseline_pair(files.path(index[i].image), files.path(index[i].conditioning)),
            args.pairs,
            args.rounds,
        )
        ours = rate(dataset.__getitem__, args.pairs, args.rounds)
    print(f"sources: {args.pairs} JPEG pairs of {width}x{height}, {args.rounds} rounds, 1 thread")
    print(f"cnet bucket: {bucket.width}x{bucket.height}; baseline crop: 1024x1024")
    print(
        f"output check: image {tuple(sample['image'].shape)} in [{sample['image'].min():.2f}, "
        f"{sample['image'].max():.2f}], condition in [{sample['conditioning_image'].min():.2f}, "
        f"{sample['conditioning_image'].max():.2f}]"
    )
    print(f"baseline (plain PIL):     {base:7.2f} pairs/s/core")
    print(f"cnet ControlNetDataset:   {ours:7.2f} pairs/s/core")
    ratio = ours / base
    verdict = "meets" if ratio >= TARGET_RATIO else "MISSES"
    print(f"speed-up: {ratio:.2f}x ({verdict} the {TARGET_RATIO:.0f}x target)")


if __name__ == "__main__":
    main()
