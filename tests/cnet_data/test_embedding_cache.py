"""The memory-mapped text-embedding cache: format, writer, reader, lookup table."""

from __future__ import annotations

import logging
import multiprocessing
import os
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hypothesis.strategies as st
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from torch.utils.data import DataLoader, Dataset
from typing_extensions import override

from cnet_data.captions import caption_key
from cnet_data.embcache import (
    CacheCorruptError,
    CacheMismatchError,
    EmbeddingCache,
    EmbeddingCacheWriter,
    FieldSpec,
    finalize,
)
from cnet_data.embcache import keyset as keyset_module
from cnet_data.embcache import reader as reader_module
from cnet_data.embcache.lookup import build_lookup
from cnet_data.embcache.lookup_file import LOOKUP_NAME, load_lookup

FINGERPRINT = {"model": "tiny-sdxl", "tokenizer": "clip-l", "max_length": 77, "hidden": -2}
FIELDS = (
    FieldSpec("prompt_embeds", (7, 12), "bfloat16"),
    FieldSpec("pooled_prompt_embeds", (5,), "bfloat16"),
)


def keys_for(captions: list[str]) -> list[bytes]:
    return [caption_key(c) for c in captions]


def embeddings(n: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f.name: torch.randn((n, *f.shape), generator=g) for f in FIELDS}


def write(
    directory: Path, captions: list[str], seed: int = 0, **kwargs: Any
) -> dict[str, torch.Tensor]:
    tensors = embeddings(len(captions), seed)
    kwargs.setdefault("shard_records", 4)
    with EmbeddingCacheWriter(directory, fingerprint=FINGERPRINT, fields=FIELDS, **kwargs) as w:
        w.add(keys_for(captions), tensors)
    return tensors


def shard_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("shard-"))


def assert_entry(
    cache: EmbeddingCache, caption: str, tensors: dict[str, torch.Tensor], i: int
) -> None:
    got = cache.get(caption_key(caption))
    for f in FIELDS:
        assert got[f.name].dtype == f.torch_dtype
        assert torch.equal(got[f.name], tensors[f.name][i].to(f.torch_dtype)), (caption, f.name)


# --- round trip ------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_round_trip_is_exact_after_casting_to_the_storage_dtype(tmp_path: Path, dtype: str) -> None:
    # Odd sizes (3 x 5 half floats = 30 bytes) exercise the 8-byte field padding.
    fields = [FieldSpec("a", (3, 5), dtype), FieldSpec("b", (3,), dtype)]
    tensors = {"a": torch.randn(10, 3, 5) * 100, "b": torch.randn(10, 3)}
    keys = keys_for([f"caption {i}" for i in range(10)])
    with EmbeddingCacheWriter(tmp_path, fingerprint=FINGERPRINT, fields=fields) as w:
        w.add(keys, tensors)
    cache = EmbeddingCache(tmp_path)
    torch_dtype = fields[0].torch_dtype
    for i, key in enumerate(keys):
        got = cache.get(key)
        assert set(got) == {"a", "b"}
        for name in ("a", "b"):
            assert got[name].dtype == torch_dtype
            assert torch.equal(got[name], tensors[name][i].to(torch_dtype))
    stacked = cache.get_many([keys[3], keys[0], keys[3]])
    assert torch.equal(stacked["a"], tensors["a"][[3, 0, 3]].to(torch_dtype))
    assert torch.equal(stacked["b"], tensors["b"][[3, 0, 3]].to(torch_dtype))
    assert cache.get_many([])["a"].shape == (0, 3, 5)


def test_get_accepts_hex_keys_and_returns_writable_copies(tmp_path: Path) -> None:
    tensors = write(tmp_path, ["a cat", "a dog"])
    cache = EmbeddingCache(tmp_path)
    got = cache.get(caption_key("a dog").hex())
    assert torch.equal(got["pooled_prompt_embeds"], tensors["pooled_prompt_embeds"][1].bfloat16())
    got["pooled_prompt_embeds"].zero_()  # a view of the read-only map would fault here
    assert_entry(cache, "a dog", tensors, 1)


def test_shards_hold_shard_records_each_and_the_rest_goes_in_the_last(tmp_path: Path) -> None:
    write(tmp_path, [f"c{i}" for i in range(10)], shard_records=4)
    assert shard_files(tmp_path) == [f"shard-r00000-00000{i}.bin" for i in range(3)]
    sizes = [(tmp_path / n).stat().st_size for n in shard_files(tmp_path)]
    assert sizes[0] == sizes[1] > sizes[2]
    assert len(EmbeddingCache(tmp_path)) == 10


# --- dedup and resume ------------------------------------------------------------------------


def test_identical_captions_are_stored_once(tmp_path: Path) -> None:
    tensors = embeddings(4)
    keys = keys_for(["x", "y", "x", "z"])
    with EmbeddingCacheWriter(tmp_path, fingerprint=FINGERPRINT, fields=FIELDS) as w:
        assert w.add(keys, tensors) == 3
        assert w.add(keys_for(["y", "w"]), embeddings(2, seed=1)) == 1
        assert w.pending == 4
    cache = EmbeddingCache(tmp_path)
    assert len(cache) == 4
    assert_entry(cache, "x", tensors, 0)  # the first occurrence wins
    assert_entry(cache, "y", tensors, 1)


def test_a_reopened_writer_skips_what_is_stored(tmp_path: Path) -> None:
    first = write(tmp_path, ["a", "b", "c", "d", "e"], shard_records=2)
    names = shard_files(tmp_path)
    with EmbeddingCacheWriter(tmp_path, fingerprint=FINGERPRINT, fields=FIELDS) as w:
        wanted = keys_for(["c", "f", "a", "g", "f"])
        assert w.missing(wanted) == keys_for(["f", "g"])
        assert w.missing([k.hex() for k in wanted]) == keys_for(["f", "g"])
        second = embeddings(5, seed=1)
        assert w.add(wanted, second) == 2
        assert w.missing(wanted) == []  # buffered counts as stored
    new_names = shard_files(tmp_path)
    assert set(names) < set(new_names)  # sequence numbers continue, nothing overwritten
    cache = EmbeddingCache(tmp_path)
    assert len(cache) == 7
    assert_entry(cache, "c", first, 2)  # not replaced by the second run's tensors
    assert_entry(cache, "f", second, 1)
    assert_entry(cache, "g", second, 3)


def test_missing_stays_correct_when_the_key_set_compacts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(keyset_module, "_RECENT_LIMIT", 3)  # force several compacted levels
    write(tmp_path, [f"old {i}" for i in range(5)])
    captions = [f"new {i}" for i in range(20)]
    with EmbeddingCacheWriter(tmp_path, fingerprint=FINGERPRINT, fields=FIELDS) as w:
        for i in range(0, 20, 2):
            w.add(keys_for(captions[i : i + 2]), embeddings(2, seed=i))
            assert w.add(keys_for(captions[: i + 2]), embeddings(i + 2)) == 0
        probe = [f"old {i}" for i in range(5)] + captions + ["fresh"]
        assert w.missing(keys_for(probe)) == keys_for(["fresh"])
        assert len(w._known) == 25
        assert len(w._known._recent) < 3  # the rest really went through compacted tables
    assert len(EmbeddingCache(tmp_path)) == 25


def _write_rank(directory: Path, rank: int, captions: list[str]) -> None:
    write(directory, captions, seed=0, rank=rank, shard_records=3)


def test_ranks_write_one_directory_at_once_then_finalize(tmp_path: Path) -> None:
    all_captions = [f"caption {i}" for i in range(40)]
    per_rank = {r: [*all_captions[r::4], "shared by every rank"] for r in range(4)}
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_write_rank, args=(tmp_path, r, c)) for r, c in per_rank.items()]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    assert {n[:12] for n in shard_files(tmp_path)} == {f"shard-r0000{r}" for r in range(4)}
    assert finalize(tmp_path) == 41
    cache = EmbeddingCache(tmp_path, expected_fingerprint=FINGERPRINT)
    assert cache._built is None  # the finalized table is used
    assert len(cache) == 41
    for captions in per_rank.values():
        tensors = embeddings(len(captions), seed=0)
        for i, caption in enumerate(captions[:-1]):
            assert_entry(cache, caption, tensors, i)
    assert caption_key("shared by every rank") in cache


def test_a_caption_two_ranks_stored_at_once_is_read_once(tmp_path: Path) -> None:
    def writer(rank: int) -> EmbeddingCacheWriter:
        return EmbeddingCacheWriter(tmp_path, fingerprint=FINGERPRINT, fields=FIELDS, rank=rank)

    first, second = writer(0), writer(1)  # neither sees the other's shards
    tensors = embeddings(2)
    with first, second:
        first.add(keys_for(["both", "only 0"]), tensors)
        second.add(keys_for(["both"]), embeddings(1, seed=1))
    assert len(shard_files(tmp_path)) == 2
    for cache in (EmbeddingCache(tmp_path), EmbeddingCache(tmp_path)):
        assert len(cache) == 2
        assert_entry(cache, "both", tensors, 0)  # rank 0's shard comes first
        finalize(tmp_path)


# --- the lookup table ------------------------------------------------------------------------


def test_lookup_built_in_memory_equals_the_finalized_one(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    tensors = write(tmp_path, [f"c{i}" for i in range(50)], shard_records=7)
    with caplog.at_level(logging.WARNING):
        in_memory = EmbeddingCache(tmp_path)
    assert "finalize" in caplog.text
    assert in_memory._built is not None
    finalize(tmp_path)
    loaded = load_lookup(tmp_path / LOOKUP_NAME)
    assert loaded is not None
    table = loaded[0]
    assert np.array_equal(table.starts, in_memory._built.starts)
    assert np.array_equal(table.keys, in_memory._built.keys)
    assert np.array_equal(table.location, in_memory._built.location)
    mapped = EmbeddingCache(tmp_path)
    assert mapped._built is None
    for i in range(50):
        assert_entry(mapped, f"c{i}", tensors, i)


def test_a_stale_lookup_file_is_not_trusted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    write(tmp_path, ["a", "b"])
    finalize(tmp_path)
    later = write(tmp_path, ["c", "d"], seed=3)  # a new shard the lookup does not cover
    with caplog.at_level(logging.WARNING):
        cache = EmbeddingCache(tmp_path)
    assert "covers 1 shards, the cache has 2" in caplog.text
    assert len(cache) == 4
    assert_entry(cache, "d", later, 1)
    (tmp_path / "shard-r00000-000000.bin").unlink()  # and a shard gone since finalize
    finalize(tmp_path)
    write(tmp_path, ["a"], seed=5)
    assert len(EmbeddingCache(tmp_path)) == 3


def test_a_damaged_lookup_file_is_rebuilt_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    tensors = write(tmp_path, ["a", "b", "c"])
    finalize(tmp_path)
    path = tmp_path / LOOKUP_NAME
    path.write_bytes(path.read_bytes()[:100])
    with caplog.at_level(logging.WARNING):
        cache = EmbeddingCache(tmp_path)
    assert "ignoring damaged" in caplog.text
    assert_entry(cache, "c", tensors, 2)


@settings(max_examples=30, deadline=None)
@given(
    prefixes=st.lists(st.integers(0, 3), min_size=0, max_size=60),
    n_shards=st.integers(1, 4),
)
def test_lookup_finds_every_key_despite_colliding_slots(prefixes: list[int], n_shards: int) -> None:
    # Keys sharing their first 8 bytes always share a slot: the probing must compare all 16.
    rng = np.random.default_rng(len(prefixes))
    keys = np.zeros((len(prefixes), 16), np.uint8)
    keys[:, 0] = prefixes
    keys[:, 8] = rng.integers(0, 3, size=len(prefixes))  # 12 distinct keys: many duplicates
    shards = np.array_split(keys, n_shards)
    table = build_lookup(shards)
    expected: dict[bytes, tuple[int, int]] = {}
    for s, chunk in enumerate(shards):
        for r, key in enumerate(chunk):
            expected.setdefault(key.tobytes(), (s, r))  # the first occurrence wins
    assert len(table) == len(expected)
    found = table.find_many(keys)
    for key, idx in zip(keys, found, strict=True):
        assert idx == table.find(key.tobytes())
        assert tuple(table.location[idx]) == expected[key.tobytes()]
    absent = np.full((1, 16), 9, np.uint8)
    assert table.find_many(absent)[0] == -1
    assert table.find(absent.tobytes()) == -1


# --- errors ----------------------------------------------------------------------------------


def test_a_fingerprint_mismatch_names_the_entry(tmp_path: Path) -> None:
    write(tmp_path, ["a"])
    other = {**FINGERPRINT, "model": "sd15"}
    with pytest.raises(CacheMismatchError, match=r"model 'sd15' != 'tiny-sdxl'.*cnet-train embed"):
        EmbeddingCache(tmp_path, expected_fingerprint=other)
    with pytest.raises(CacheMismatchError, match="model 'sd15' != 'tiny-sdxl'"):
        EmbeddingCacheWriter(tmp_path, fingerprint=other, fields=FIELDS)
    fewer = {k: v for k, v in FINGERPRINT.items() if k != "max_length"}
    with pytest.raises(CacheMismatchError, match="max_length 77 in the cache is not expected"):
        EmbeddingCache(tmp_path, expected_fingerprint=fewer)
    with pytest.raises(CacheMismatchError, match="dtype 'bf16' is missing from the cache"):
        EmbeddingCache(tmp_path, expected_fingerprint={**FINGERPRINT, "dtype": "bf16"})
    # Tuples read back as lists: a fingerprint that round-trips through JSON still matches.
    assert len(EmbeddingCache(tmp_path, expected_fingerprint=dict(FINGERPRINT))) == 1


def test_other_fields_are_refused(tmp_path: Path) -> None:
    write(tmp_path, ["a"])
    fields = (FieldSpec("prompt_embeds", (7, 12), "float16"), FIELDS[1])
    with pytest.raises(CacheMismatchError, match="stores other fields"):
        EmbeddingCacheWriter(tmp_path, fingerprint=FINGERPRINT, fields=fields)


def test_wrong_tensors_are_refused_naming_the_field(tmp_path: Path) -> None:
    with EmbeddingCacheWriter(tmp_path, fingerprint=FINGERPRINT, fields=FIELDS) as w:
        bad = embeddings(2)
        bad["pooled_prompt_embeds"] = torch.zeros(2, 6)
        with pytest.raises(ValueError, match=r"'pooled_prompt_embeds' has shape \[2, 6\]"):
            w.add(keys_for(["a", "b"]), bad)
        with pytest.raises(ValueError, match="'prompt_embeds' is missing"):
            w.add(keys_for(["a"]), {"pooled_prompt_embeds": torch.zeros(1, 5)})
        with pytest.raises(ValueError, match=r"has shape \[2, 7, 12\], expected \[3, 7, 12\]"):
            w.add(keys_for(["a", "b", "c"]), embeddings(2))
        with pytest.raises(ValueError, match="16 bytes"):
            w.add([b"short", b"keys"], embeddings(2))
        assert w.pending == 0
        assert w.missing(keys_for(["a"])) == keys_for(["a"])  # nothing half-added


def test_a_truncated_shard_is_reported_by_name(tmp_path: Path) -> None:
    write(tmp_path, [f"c{i}" for i in range(6)], shard_records=4)
    shard = tmp_path / "shard-r00000-000001.bin"
    size = shard.stat().st_size
    with shard.open("r+b") as fh:
        fh.truncate(size - 5)
    pattern = rf"shard-r00000-000001\.bin is truncated: {size - 5} bytes, expected {size}"
    with pytest.raises(CacheCorruptError, match=pattern):
        EmbeddingCache(tmp_path)
    with pytest.raises(CacheCorruptError, match=pattern):
        EmbeddingCacheWriter(tmp_path, fingerprint=FINGERPRINT, fields=FIELDS)
    (tmp_path / "shard-r00000-000000.bin").write_bytes(b"garbage")
    with pytest.raises(CacheCorruptError, match=r"shard-r00000-000000\.bin"):
        EmbeddingCache(tmp_path)


def test_not_a_cache_and_another_version_are_refused(tmp_path: Path) -> None:
    with pytest.raises(CacheCorruptError, match="not an embedding cache"):
        EmbeddingCache(tmp_path)
    write(tmp_path, ["a"])
    header = tmp_path / "header.json"
    header.write_text(header.read_text().replace('"version": 1', '"version": 99'))
    with pytest.raises(CacheMismatchError, match="version 99"):
        EmbeddingCache(tmp_path)


def test_a_missing_key_raises_key_error_naming_it(tmp_path: Path) -> None:
    write(tmp_path, ["a"])
    cache = EmbeddingCache(tmp_path)
    absent = caption_key("not there")
    with pytest.raises(KeyError, match=rf"{absent.hex()}.*cnet-train embed"):
        cache.get(absent)
    with pytest.raises(KeyError, match=absent.hex()):
        cache.get_many([caption_key("a"), absent])
    assert absent not in cache
    assert caption_key("a") in cache
    assert 42 not in cache


# --- crashes ---------------------------------------------------------------------------------


def test_a_failed_shard_write_leaves_no_partial_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def disk_full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    w = EmbeddingCacheWriter(tmp_path, fingerprint=FINGERPRINT, fields=FIELDS, shard_records=3)
    with monkeypatch.context() as m:
        m.setattr(os, "fsync", disk_full)  # the shard's bytes are written, the commit fails
        with pytest.raises(OSError, match="No space left"):
            w.add(keys_for(["a", "b", "c", "d"]), embeddings(4))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["header.json"]  # no temp files left
    assert w.pending == 4  # the buffer is kept for another try
    w.close()
    assert len(EmbeddingCache(tmp_path)) == 4


def test_an_exception_inside_the_writer_block_drops_the_buffer(tmp_path: Path) -> None:
    def embed_then_crash(w: EmbeddingCacheWriter) -> None:
        with w:
            w.add(keys_for(["a"]), embeddings(1))
            raise RuntimeError("encoder crashed")

    w = EmbeddingCacheWriter(tmp_path, fingerprint=FINGERPRINT, fields=FIELDS)
    with pytest.raises(RuntimeError, match="encoder crashed"):
        embed_then_crash(w)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["header.json"]
    with pytest.raises(RuntimeError, match="closed"):
        w.add(keys_for(["b"]), embeddings(1))


# --- processes -------------------------------------------------------------------------------


class CaptionDataset(Dataset[dict[str, Any]]):
    def __init__(self, cache: EmbeddingCache, captions: list[str]) -> None:
        self.cache, self.captions = cache, captions

    def __len__(self) -> int:
        return len(self.captions)

    @override
    def __getitem__(self, i: int) -> dict[str, Any]:
        tensors = self.cache.get(caption_key(self.captions[i]))
        # After the get, the pid the cache opened its maps in: must be this worker's own.
        return {"index": i, "pid": os.getpid(), "maps_pid": self.cache._pid, **tensors}


def batches(loader: DataLoader[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    yield from loader


def test_forked_dataloader_workers_read_the_right_tensors(tmp_path: Path) -> None:
    captions = [f"c{i}" for i in range(24)]
    tensors = write(tmp_path, captions, shard_records=5)
    finalize(tmp_path)
    cache = EmbeddingCache(tmp_path)
    cache.get(caption_key("c0"))  # the parent's maps are open before the fork
    loader = DataLoader(
        CaptionDataset(cache, captions),
        batch_size=4,
        num_workers=2,
        multiprocessing_context="fork",
    )
    pids, seen = set(), 0
    for batch in batches(loader):
        idx = batch["index"]
        pids.update(batch["pid"].tolist())
        assert torch.equal(batch["maps_pid"], batch["pid"])
        for f in FIELDS:
            assert torch.equal(batch[f.name], tensors[f.name][idx].to(f.torch_dtype))
        seen += len(idx)
    assert seen == 24
    assert os.getpid() not in pids
    assert len(pids) == 2


def test_pickling_leaves_the_maps_behind(tmp_path: Path) -> None:
    tensors = write(tmp_path, [f"c{i}" for i in range(40)])
    finalize(tmp_path)
    cache = EmbeddingCache(tmp_path)
    assert_entry(cache, "c3", tensors, 3)
    blob = pickle.dumps(cache)
    # Neither the lookup table nor the shards' keys travel with it: only paths and the layout.
    assert caption_key("c3") not in blob
    assert len(blob) < 4096
    clone = pickle.loads(blob)
    assert len(clone) == 40
    assert_entry(clone, "c39", tensors, 39)
    assert clone.get_many(keys_for(["c1"]))["prompt_embeds"].shape == (1, 7, 12)


def test_a_new_pid_reopens_files_and_table(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tensors = write(tmp_path, ["a", "b"])
    finalize(tmp_path)
    cache = EmbeddingCache(tmp_path)
    assert_entry(cache, "a", tensors, 0)
    parent_fd, parent_table = cache._files[0], cache._table
    monkeypatch.setattr(os, "getpid", lambda: 999_999)
    assert_entry(cache, "b", tensors, 1)
    assert cache._pid == 999_999
    assert cache._files[0] != parent_fd
    assert cache._table is not parent_table
    os.close(parent_fd)


def test_open_shard_files_are_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(reader_module, "_MAX_OPEN_SHARDS", 2)
    captions = [f"c{i}" for i in range(40)]
    tensors = write(tmp_path, captions, shard_records=5)  # 8 shards
    cache = EmbeddingCache(tmp_path)
    for i, caption in enumerate(captions):
        assert_entry(cache, caption, tensors, i)
        assert len(cache._files) <= 2
    cache.close()
    assert not cache._files
