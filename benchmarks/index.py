"""Index load time and memory for a large synthetic index (default 1M samples).

Writes an index of N synthetic entries (realistic path and caption lengths), then, in a fresh
process, measures the time to open it, the process RSS before and after, the cost of deriving
bucket ids for every sample (what training does at start), and random sample lookups.

    python benchmarks/index.py [--samples 1000000]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from cnet_data.index import IndexBuilder

MEASURE = r"""
import json, sys, time
import numpy as np, psutil
from cnet_data.buckets import BucketConfig, BucketTable
from cnet_data.index import DatasetIndex
proc = psutil.Process()

def rss_parts():
    fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return {k: int(fields[k].split()[0]) * 1024 for k in ("RssAnon", "RssFile")}

rss0 = proc.memory_info().rss
start = time.perf_counter()
index = DatasetIndex(sys.argv[1])
opened = time.perf_counter() - start
rss1 = proc.memory_info().rss
start = time.perf_counter()
ids = BucketTable.from_config(BucketConfig()).assign(index.widths, index.heights)
assigned = time.perf_counter() - start
rng = np.random.default_rng(0)
picks = rng.integers(0, len(index), size=100_000)
start = time.perf_counter()
for i in picks:
    index[int(i)]
lookups = len(picks) / (time.perf_counter() - start)
rss2 = proc.memory_info().rss
print(json.dumps({"n": len(index), "open_s": opened, "rss_before": rss0, "rss_open": rss1,
                  "assign_s": assigned, "lookups_per_s": lookups, "rss_after": rss2,
                  "parts_after": rss_parts()}))
"""


def build(directory: Path, n: int) -> float:
    start = time.perf_counter()
    builder = IndexBuilder()
    for i in range(n):
        shard = f"shard-{i // 10_000:04d}"
        builder.add(
            f"{shard}/images/{i:09d}.jpg",
            f"{shard}/conditioning/{i:09d}.png",
            f"a photograph of subject {i % 50_000} in style {i % 97}, high detail",
            512 + (i * 37) % 1536,
            512 + (i * 91) % 1536,
        )
    builder.write(directory, root=directory.parent)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=1_000_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp) / "index"
        built = build(directory, args.samples)
        size = sum(p.stat().st_size for p in directory.iterdir())
        out = subprocess.run(
            [sys.executable, "-c", MEASURE, str(directory)],
            capture_output=True,
            text=True,
            check=True,
        )
    r = json.loads(out.stdout)
    mb = 1024 * 1024
    print(f"samples: {r['n']:,}; index on disk: {size / mb:.1f} MB; built in {built:.1f} s")
    print(f"open: {r['open_s'] * 1000:.1f} ms (target: well under 1 s)")
    print(
        f"RSS: {r['rss_before'] / mb:.1f} MB before open, {r['rss_open'] / mb:.1f} MB after open "
        f"(+{(r['rss_open'] - r['rss_before']) / mb:.1f} MB)"
    )
    print(f"bucket assignment for all samples: {r['assign_s'] * 1000:.0f} ms")
    parts = r["parts_after"]
    print(
        f"random sample lookups: {r['lookups_per_s']:,.0f}/s; RSS after 100k lookups: "
        f"{r['rss_after'] / mb:.1f} MB ({parts['RssAnon'] / mb:.1f} MB private, "
        f"{parts['RssFile'] / mb:.1f} MB mapped index pages, reclaimable page cache)"
    )
    print(f"(this machine: {psutil.cpu_count()} cores)")


if __name__ == "__main__":
    main()
