"""Embedding cache: reader RSS and random lookup rate as the cache grows (prints figures).

    python benchmarks/embedding_cache.py [--counts 10000,1000000] [--sdxl-count 10000]

Each cache is written with `EmbeddingCacheWriter`, finalized, then measured in a fresh
subprocess: RSS after the imports, after opening the cache, and after `--lookups` random
`get()` calls done twice (the second pass reads from the page cache).
A full SDXL record (77x2048 + 1280 bf16, about 318 KB) times 1M entries is 318 GB, so the RSS
comparison across sizes uses one smaller record for every size, and a separate SDXL-sized
cache gives the lookup rate at real size.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import torch

from cnet_data.captions import caption_key
from cnet_data.embcache import EmbeddingCache, EmbeddingCacheWriter, FieldSpec, finalize

RECORDS = {
    "small": ((77, 64), (40,)),
    "sdxl": ((77, 2048), (1280,)),
}
BLOCK = 256  # distinct random rows, reused across batches: writing stays cheap
RSS_GROWTH_TARGET_MB = 50
WARM_RATE_TARGET = 5000
MB = 1 << 20


def fields_of(record: str) -> list[FieldSpec]:
    embeds, pooled = RECORDS[record]
    return [
        FieldSpec("prompt_embeds", embeds, "bfloat16"),
        FieldSpec("pooled_prompt_embeds", pooled, "bfloat16"),
    ]


def record_bytes(record: str) -> int:
    return sum(f.nbytes + 16 for f in fields_of(record))  # + key; padding is nil here


def block(record: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        f.name: torch.randn((BLOCK, *f.shape), generator=g).to(f.torch_dtype)
        for f in fields_of(record)
    }


def key(i: int) -> bytes:
    return caption_key(f"caption {i}")


def build(directory: Path, record: str, count: int) -> float:
    """Write `count` entries (entry i holds block row i % BLOCK); returns the seconds taken."""
    data, batch = block(record), 8192 if record == "small" else 256
    shard_records = 65536 if record == "small" else 1024
    start = time.perf_counter()
    fp = {"model": "benchmark", "record": record}
    with EmbeddingCacheWriter(
        directory, fingerprint=fp, fields=fields_of(record), shard_records=shard_records
    ) as writer:
        for lo in range(0, count, batch):
            n = min(batch, count - lo)
            rows = torch.arange(lo, lo + n) % BLOCK
            writer.add([key(i) for i in range(lo, lo + n)], {k: v[rows] for k, v in data.items()})
    finalize(directory)
    return time.perf_counter() - start


def proc_status() -> dict[str, float]:
    """VmRSS, RssAnon and RssFile of this process in MB, plus psutil's RSS."""
    out: dict[str, float] = {"psutil_rss": psutil.Process().memory_info().rss / MB}
    for line in Path("/proc/self/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "RssAnon", "RssFile"):
            out[name] = int(value.split()[0]) / 1024
    return out


def measure(directory: Path, record: str, count: int, lookups: int) -> dict[str, Any]:
    """Runs in a fresh process: open, look up twice, report RSS and rates."""
    keys = [key(int(i)) for i in np.random.default_rng(0).integers(0, count, lookups)]
    result: dict[str, Any] = {"after_imports": proc_status()}
    start = time.perf_counter()
    cache = EmbeddingCache(directory)
    result["open_s"] = time.perf_counter() - start
    result["after_open"] = proc_status()
    assert len(cache) == count, (len(cache), count)
    for name in ("first_pass", "warm_pass"):
        start = time.perf_counter()
        for k in keys:
            cache.get(k)
        result[f"{name}_per_s"] = lookups / (time.perf_counter() - start)
    result["after_lookups"] = proc_status()
    expected = block(record)
    for i in (0, count // 2, count - 1):  # the data read back is the data written
        got = cache.get(key(i))
        assert all(torch.equal(got[n], expected[n][i % BLOCK]) for n in expected)
    return result


def run_measure(directory: Path, record: str, count: int, lookups: int) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    argv = [sys.executable, __file__, "--measure", str(directory), "--record", record]
    argv += ["--count", str(count), "--lookups", str(lookups)]
    done = subprocess.run(argv, env=env, check=True, capture_output=True, text=True)
    parsed: dict[str, Any] = json.loads(done.stdout.splitlines()[-1])
    return parsed


def du_mb(directory: Path) -> float:
    return sum(p.stat().st_size for p in directory.iterdir()) / MB


def bench_one(scratch: Path, record: str, count: int, lookups: int) -> dict[str, Any] | None:
    need = count * record_bytes(record) * 1.05 + 256 * MB
    free = shutil.disk_usage(scratch).free
    if need > free:
        print(f"  skip {count:,} x {record}: needs {need / 1e9:.1f} GB, {free / 1e9:.1f} GB free")
        return None
    directory = scratch / f"{record}-{count}"
    write_s = build(directory, record, count)
    size = du_mb(directory)
    print(f"  wrote {count:,} x {record} ({size:,.0f} MB) in {write_s:.1f} s", flush=True)
    try:
        result = run_measure(directory, record, count, lookups)
    finally:
        shutil.rmtree(directory)
    result.update(count=count, record=record, size_mb=size, write_s=write_s)
    return result


COLUMNS = (
    ("entries", 9),
    ("record", 6),
    ("disk MB", 8),
    ("open ms", 7),
    ("RSS imports", 11),
    ("RSS open", 8),
    ("RSS lookups", 11),
    ("anon", 6),
    ("file+", 6),
    ("1st get/s", 9),
    ("warm get/s", 10),
)


def report(r: dict[str, Any]) -> None:
    """One row; RSS in MB (psutil), anon = RssAnon and file+ = RssFile gained, after lookups."""
    imp, opn, after = r["after_imports"], r["after_open"], r["after_lookups"]
    values = (
        f"{r['count']:,}",
        r["record"],
        f"{r['size_mb']:,.0f}",
        f"{r['open_s'] * 1e3:.1f}",
        f"{imp['psutil_rss']:.1f}",
        f"{opn['psutil_rss']:.1f}",
        f"{after['psutil_rss']:.1f}",
        f"{after['RssAnon']:.1f}",
        f"{after['RssFile'] - imp['RssFile']:.0f}",
        f"{r['first_pass_per_s']:,.0f}",
        f"{r['warm_pass_per_s']:,.0f}",
    )
    print(" ".join(v.rjust(w) for v, (_, w) in zip(values, COLUMNS, strict=True)))


def summarise(small: list[dict[str, Any]], sdxl: list[dict[str, Any]]) -> None:
    if len(small) >= 2:
        lo, hi = small[0], small[-1]
        span = f"{lo['count']:,} -> {hi['count']:,} entries"
        checks = (
            ("psutil RSS after open", "after_open", "psutil_rss"),
            ("psutil RSS after lookups", "after_lookups", "psutil_rss"),
            ("RssAnon after lookups", "after_lookups", "RssAnon"),
        )
        for label, stage, field in checks:
            growth = hi[stage][field] - lo[stage][field]
            ok = "OK" if growth < RSS_GROWTH_TARGET_MB else "MISSED"
            print(
                f"RSS growth {span}, {label}: {growth:+.1f} MB "
                f"(target < {RSS_GROWTH_TARGET_MB} MB: {ok})"
            )
        growth = hi["after_lookups"]["RssFile"] - lo["after_lookups"]["RssFile"]
        print(
            f"  of which file-backed (the memory-mapped lookup table, about 40 bytes per entry; "
            f"records are read with pread and never mapped): {growth:+.1f} MB"
        )
    for r in small + sdxl:
        rate = r["warm_pass_per_s"]
        ok = "OK" if rate >= WARM_RATE_TARGET else "MISSED"
        print(
            f"warm random get() rate, {r['count']:,} x {r['record']}: {rate:,.0f}/s "
            f"(target >= {WARM_RATE_TARGET:,}/s: {ok})"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scratch", type=Path, default=None, help="default: a new /tmp dir")
    parser.add_argument("--counts", default="10000,1000000", help="entries, small records")
    parser.add_argument("--sdxl-count", type=int, default=10000, help="0 skips the SDXL run")
    parser.add_argument("--lookups", type=int, default=20000)
    parser.add_argument("--measure", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--record", default="small", help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure is not None:
        print(json.dumps(measure(args.measure, args.record, args.count, args.lookups)))
        return

    own = args.scratch is None
    scratch = Path(tempfile.mkdtemp(prefix="cnet-embcache-", dir="/tmp")) if own else args.scratch
    scratch.mkdir(parents=True, exist_ok=True)
    print(f"scratch {scratch}; {args.lookups:,} random get() per pass, each in a fresh process")
    print(
        f"small record: 77x64 + 40 bf16 ({record_bytes('small') - 16:,} B) for every size; "
        f"SDXL record: 77x2048 + 1280 bf16 ({record_bytes('sdxl') - 16:,} B)"
    )
    try:
        small = [bench_one(scratch, "small", int(c), args.lookups) for c in args.counts.split(",")]
        sdxl = (
            [bench_one(scratch, "sdxl", args.sdxl_count, args.lookups)] if args.sdxl_count else []
        )
    finally:
        if own:
            shutil.rmtree(scratch, ignore_errors=True)
    done_small = [r for r in small if r is not None]
    done_sdxl = [r for r in sdxl if r is not None]
    print()
    print(" ".join(name.rjust(w) for name, w in COLUMNS))
    for r in done_small + done_sdxl:
        report(r)
    print(
        "(MB; RSS = psutil rss; anon = RssAnon after lookups; file+ = RssFile gained since imports)"
    )
    print()
    summarise(done_small, done_sdxl)


if __name__ == "__main__":
    main()
