"""Two real processes over gloo: DataLoader + BucketBatchSampler under torch.distributed."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from cnet_data.index import DatasetIndex

WORKER = Path(__file__).with_name("distributed_worker.py")


@pytest.mark.distributed
def test_two_ranks_get_equal_batches_that_cover_the_epoch(
    tmp_path: Path,
    fill_index: DatasetIndex,
    run_ranks: Callable[[Sequence[str], int], list[str]],
) -> None:
    out = tmp_path / "result.json"
    run_ranks([str(WORKER), str(fill_index.directory), str(out)], 2)
    result = json.loads(out.read_text())
    ranks = sorted(result["ranks"], key=lambda r: r["rank"])
    bucket_ids = result["bucket_ids"]
    for epoch in range(2):
        views = [r["epochs"][epoch] for r in ranks]
        counts = [len(v["batches"]) for v in views]
        assert counts[0] == counts[1] == views[0]["len"] == views[1]["len"] > 0
        for b0, b1 in zip(views[0]["batches"], views[1]["batches"], strict=True):
            assert b0["shape"] == b1["shape"]  # same bucket on both ranks at every step
            assert {bucket_ids[i] for i in b0["indices"] + b1["indices"]} == {
                bucket_ids[b0["indices"][0]]
            }
        seen = [i for v in views for b in v["batches"] for i in b["indices"]]
        assert len(seen) == len(set(seen)) == len(fill_index)  # 12 samples, 3 buckets of 4
    first = [b["indices"] for b in ranks[0]["epochs"][0]["batches"]]
    second = [b["indices"] for b in ranks[0]["epochs"][1]["batches"]]
    assert first != second
