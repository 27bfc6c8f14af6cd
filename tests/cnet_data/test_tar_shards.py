"""The `tar` source: WebDataset-style shards indexed by byte range, read like loose files."""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cnet_data.buckets import Bucket, BucketTable
from cnet_data.cli import main
from cnet_data.dataset import ControlNetDataset
from cnet_data.index import DatasetIndex
from cnet_data.sampler import BucketBatchSampler
from cnet_data.scan import NoSamplesError, ScanConfig, scan
from cnet_data.shard_writer import ShardWriter
from cnet_data.sources import SourceConfig, SourceError
from cnet_data.synthetic import write_fill_dataset, write_fill_shards
from cnet_data.tar_shards import Member, TarShards, split_name

TABLE = BucketTable([Bucket(64, 64), Bucket(96, 64), Bucket(64, 96)])
COUNT = 18


def _index(source: SourceConfig, out: Path) -> DatasetIndex:
    builder, report = scan(source, ScanConfig(workers=1), progress=False)
    assert report.bad == []
    builder.write(out)
    return DatasetIndex(out)


@pytest.fixture
def loose_and_shards(tmp_path: Path) -> tuple[DatasetIndex, DatasetIndex]:
    """The same 18 samples as a folder of loose files and as three shards of six."""
    write_fill_dataset(tmp_path / "loose", COUNT, sidecars=True)
    shards = write_fill_shards(tmp_path / "shards", COUNT, samples_per_shard=6)
    assert [p.name for p in shards] == ["00000.tar", "00001.tar", "00002.tar"]
    loose = _index(SourceConfig(tmp_path / "loose", format="folder"), tmp_path / "i-loose")
    sharded = _index(SourceConfig(tmp_path / "shards"), tmp_path / "i-shards")
    return loose, sharded


def test_shards_index_and_read_like_the_same_loose_files(
    loose_and_shards: tuple[DatasetIndex, DatasetIndex],
) -> None:
    loose, sharded = loose_and_shards
    assert sharded.store.kind == "tar" and loose.store.kind == "files"
    assert len(sharded) == len(loose) == COUNT
    assert np.array_equal(sharded.heights, loose.heights)
    assert np.array_equal(sharded.widths, loose.widths)
    assert [sharded.caption(i) for i in range(COUNT)] == [loose.caption(i) for i in range(COUNT)]
    ids = TABLE.assign(loose.widths, loose.heights)
    assert np.array_equal(ids, TABLE.assign(sharded.widths, sharded.heights))
    a = ControlNetDataset(loose, TABLE, ids, seed=4)
    b = ControlNetDataset(sharded, TABLE, ids, seed=4)
    for i in range(COUNT):
        x, y = a[i], b[i]
        assert torch.equal(x["image"], y["image"]) and torch.equal(
            x["conditioning_image"], y["conditioning_image"]
        )
        assert x["caption"] == y["caption"]


def test_sampler_and_resume_are_the_same_over_shards(
    loose_and_shards: tuple[DatasetIndex, DatasetIndex],
) -> None:
    loose, sharded = loose_and_shards
    ids = TABLE.assign(sharded.widths, sharded.heights)
    dataset = ControlNetDataset(sharded, TABLE, ids, seed=1)

    def sampler() -> BucketBatchSampler:
        return BucketBatchSampler(ids, 2, num_replicas=1, rank=0, seed=7)

    loose_ids = TABLE.assign(loose.widths, loose.heights)
    whole = list(sampler())
    assert whole == list(BucketBatchSampler(loose_ids, 2, num_replicas=1, rank=0, seed=7))
    first = sampler()
    seen = [batch for _, batch in zip(range(3), first, strict=False)]
    resumed = sampler()
    resumed.load_state_dict(first.state_dict(consumed_batches=3))
    rest = list(resumed)
    assert seen + rest == whole
    # And the samples read after the resume are those the uninterrupted run reads.
    for batch in rest:
        for i in batch:
            assert torch.equal(
                dataset[i]["image"], ControlNetDataset(sharded, TABLE, ids, seed=1)[i]["image"]
            )


def _png(w: int, h: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    out = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(out, format="PNG")
    return out.getvalue()


def _bad_shards(folder: Path) -> None:
    """One shard of good and bad samples, a second one cut short in its last member."""
    good = {"png": _png(32, 32, 0), "cond.png": _png(32, 32, 1), "txt": b"a caption"}
    with ShardWriter(folder, samples_per_shard=100) as writer:
        writer.add("good0", {**good, "json": b'{"width": 32, "height": 32}'})
        writer.add("nocond", {"jpg": good["png"], "txt": b"x"})
        writer.add("nocaption", {"png": good["png"], "cond.png": good["cond.png"]})
        writer.add("twoimages", {**good, "jpg": good["png"]})
        writer.add("corrupt", {**good, "png": b"\x89PNG not really"})
        writer.add("mismatch", {**good, "cond.png": _png(16, 32, 2)})
        writer.add("notutf8", {**good, "txt": b"\xff\xfe"})
        writer.add("onlycond", {"cond.png": good["cond.png"], "txt": b"x"})
        writer.add("dir/good1", good)
    second = folder / "00001.tar"
    with tarfile.open(second, "w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in [("good2.png", good["png"]), ("good2.cond.png", good["cond.png"])]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        folder_member = tarfile.TarInfo("a-folder")
        folder_member.type = tarfile.DIRTYPE
        tar.addfile(folder_member)  # not a regular member: passed over
        info = tarfile.TarInfo("good2.txt")
        info.size = 4
        tar.addfile(info, io.BytesIO(b"text"))
        info = tarfile.TarInfo("cut.png")
        info.size = 100_000
        tar.addfile(info, io.BytesIO(b"\0" * 100_000))
    data = second.read_bytes()
    second.write_bytes(data[: len(data) // 2])


def test_bad_members_and_a_cut_shard_are_reported_with_exact_counts(tmp_path: Path) -> None:
    _bad_shards(tmp_path / "shards")
    config = ScanConfig(workers=1, on_bad="skip")
    builder, report = scan(SourceConfig(tmp_path / "shards"), config, progress=False)
    kinds = Counter(b.kind for b in report.bad)
    assert kinds == {
        "missing_file": 2,  # no conditioning member; no image member
        "caption_missing": 1,
        "ambiguous_pair": 1,
        "unreadable": 1,
        "size_mismatch": 1,
        "caption_not_text": 1,
        "bad_shard": 1,
    }
    assert report.accepted == len(builder) == 3  # good0, dir/good1, good2 (before the cut)
    where = {b.kind: b.where for b in report.bad}
    assert where["bad_shard"] == "00001.tar"
    assert where["caption_missing"] == "00000.tar:nocaption"
    reason = {b.kind: b.reason for b in report.bad}
    assert "nocond.cond.png" in next(b.reason for b in report.bad if b.kind == "missing_file")
    assert reason["bad_shard"].startswith("member cut.png is cut off at byte")
    assert "BytesIO" not in reason["unreadable"] and "corrupt.png" in reason["unreadable"]


def test_conditioning_extension_and_a_single_shard_path(tmp_path: Path) -> None:
    good = {"jpg": _png(32, 32, 0), "hint.png": _png(32, 32, 1), "txt": b"caption"}
    with ShardWriter(tmp_path / "one", samples_per_shard=10) as writer:
        writer.add("k", good)
    (shard,) = writer.shards
    config = SourceConfig(shard, conditioning_extension="hint.png")
    assert config.resolved_format == "tar" and config.root == shard.parent
    index = _index(config, tmp_path / "index")
    assert index.caption(0) == "caption" and index.store.describe(index[0].image).endswith(
        "00000.tar member k.jpg"
    )
    # Under the default extension the same shard has no conditioning member.
    with pytest.raises(NoSamplesError) as refused:
        scan(SourceConfig(shard), ScanConfig(workers=1), progress=False)
    (bad,) = refused.value.report.bad  # a second image member, not a conditioning one
    assert bad.kind == "ambiguous_pair" and "k.jpg, k.hint.png" in bad.reason


def test_a_moved_index_and_shards_still_read_and_a_cut_shard_names_itself(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    write_fill_shards(tmp_path / "shards", 4, samples_per_shard=2)
    _index(SourceConfig(tmp_path / "shards"), tmp_path / "index")
    shutil.move(tmp_path / "shards", tmp_path / "moved")
    index = DatasetIndex(tmp_path / "index", root=tmp_path / "moved")
    dataset = ControlNetDataset(index, TABLE, TABLE.assign(index.widths, index.heights))
    assert dataset[3]["image"].shape[0] == 3
    last = tmp_path / "moved" / "00001.tar"
    last.write_bytes(last.read_bytes()[:1024])
    dataset[3]  # replaced by another sample of its bucket, and said so
    assert "00001.tar member 000003.png" in caplog.text
    assert "gave 0 bytes of member 000003.png, indexed as" in caplog.text


def test_compressed_or_missing_shards_are_refused_with_the_reason(tmp_path: Path) -> None:
    folder = tmp_path / "gz"
    folder.mkdir()
    (folder / "00000.tar.gz").write_bytes(b"\x1f\x8b")
    with pytest.raises(SourceError, match=r"holds no \.tar shard") as refused:
        scan(SourceConfig(folder, format="tar"), ScanConfig(workers=1), progress=False)
    assert "uncompressed" in refused.value.hint


def test_references_and_keys_round_trip() -> None:
    member = Member("a/00000.tar", 1536, 20, "dir/x:y.cond.png")
    assert TarShards.member(TarShards.reference(member)) == member
    with pytest.raises(ValueError, match="not a tar member"):
        TarShards.member("images/000.png")
    assert split_name("a/000123.cond.png") == ("a/000123", "cond.png")
    assert split_name("000123.JPG") == ("000123", "jpg")
    assert split_name("noext") == ("noext", "")


def test_an_interrupted_writer_leaves_no_partial_shard(tmp_path: Path) -> None:
    def write_then_fail() -> None:
        with ShardWriter(tmp_path, samples_per_shard=2) as writer:
            writer.add("a", {"txt": b"1"})
            writer.add("b", {"txt": b"2"})  # the first shard is complete here
            writer.add("c", {"txt": b"3"})
            raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        write_then_fail()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00000.tar"]
    with pytest.raises(ValueError, match="without dots"):
        ShardWriter(tmp_path / "other").add("a.b", {"txt": b""})


def test_the_index_command_reads_shards(tmp_path: Path) -> None:
    write_fill_shards(tmp_path / "shards", 6, samples_per_shard=4)
    out = tmp_path / "idx"
    assert (
        main(["index", str(tmp_path / "shards"), "--out", str(out), "--quiet", "--workers", "1"])
        == 0
    )
    assert len(DatasetIndex(out)) == 6
    report = json.loads((tmp_path / "idx.report.json").read_text())
    assert report["accepted"] == 6 and report["bad"] == 0


def test_metadata_sizes_skip_the_image_reads_where_a_json_member_has_them(
    tmp_path: Path,
) -> None:
    write_fill_shards(tmp_path / "shards", 6, samples_per_shard=6)
    good = {"png": _png(32, 48, 0), "cond.png": _png(32, 48, 1), "txt": b"caption"}
    with ShardWriter(tmp_path / "more", samples_per_shard=10) as writer:
        writer.add("nojson", good)  # sizes from the headers: 48 high, 32 wide
        writer.add("lies", {**good, "png": b"not a png", "json": b'{"width": 8, "height": 9}'})
        writer.add("badjson", {**good, "json": b"{not json"})
    header, metadata = (
        ScanConfig(workers=1, on_bad="skip"),
        ScanConfig(workers=1, on_bad="skip", verify="metadata"),
    )
    by_headers, _ = scan(SourceConfig(tmp_path / "shards"), header, progress=False)
    by_json, _ = scan(SourceConfig(tmp_path / "shards"), metadata, progress=False)
    by_headers.write(tmp_path / "a")
    by_json.write(tmp_path / "b")
    a, b = DatasetIndex(tmp_path / "a"), DatasetIndex(tmp_path / "b")
    assert np.array_equal(a.heights, b.heights) and np.array_equal(a.widths, b.widths)

    trusted, report = scan(SourceConfig(tmp_path / "more"), metadata, progress=False)
    assert report.accepted == 3 and report.bad == []  # the corrupt image is not read
    trusted.write(tmp_path / "c")
    c = DatasetIndex(tmp_path / "c")
    assert [(int(h), int(w)) for h, w in zip(c.heights, c.widths, strict=True)] == [
        (48, 32),
        (9, 8),
        (48, 32),
    ]
    _, checked = scan(SourceConfig(tmp_path / "more"), header, progress=False)
    assert [b.kind for b in checked.bad] == ["unreadable"]  # headers read: the lie is found


def test_named_shards_extension_dots_and_repeated_members(tmp_path: Path) -> None:
    good = {"png": _png(32, 32, 0), "cond.png": _png(32, 32, 1), "txt": b"caption"}
    with ShardWriter(tmp_path / "w", samples_per_shard=10) as writer:
        writer.add("k", good)
    part = tmp_path / "data.tar.part"  # a shard under a name that does not end in .tar
    (tmp_path / "w" / "00000.tar").rename(part)
    config = SourceConfig(part, format="tar", conditioning_extension=".cond.png")
    assert config.root == tmp_path
    index = _index(config, tmp_path / "index")
    assert index.caption(0) == "caption"
    with tarfile.open(tmp_path / "twice.tar", "w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in [*((f"k.{e}", d) for e, d in good.items()), ("k.png", good["png"])]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    skip = ScanConfig(workers=1, on_bad="skip")
    with pytest.raises(NoSamplesError) as refused:
        scan(SourceConfig(tmp_path / "twice.tar"), skip, progress=False)
    (bad,) = refused.value.report.bad
    assert bad.kind == "ambiguous_pair" and "appears twice" in bad.reason


def test_recorded_sizes_obey_max_pixels_and_a_used_folder_is_refused(tmp_path: Path) -> None:
    good = {"png": _png(32, 32, 0), "cond.png": _png(32, 32, 1), "txt": b"caption"}
    with ShardWriter(tmp_path / "s", samples_per_shard=10) as writer:
        writer.add("huge", {**good, "json": b'{"width": 100000, "height": 100000}'})
        writer.add("fine", {**good, "json": b'{"width": 32, "height": 32}'})
    config = ScanConfig(workers=1, on_bad="skip", verify="metadata")
    _, report = scan(SourceConfig(tmp_path / "s"), config, progress=False)
    assert report.accepted == 1 and [b.kind for b in report.bad] == ["decompression_bomb"]
    with pytest.raises(ValueError, match=r"already holds \.tar shards"):
        ShardWriter(tmp_path / "s")


def test_a_shard_replaced_after_a_read_is_read_afresh(tmp_path: Path) -> None:
    write_fill_shards(tmp_path / "a", 2, samples_per_shard=2, seed=0)
    write_fill_shards(tmp_path / "b", 2, samples_per_shard=2, seed=5)
    index = _index(SourceConfig(tmp_path / "a"), tmp_path / "index")
    caption = index[1].caption_key
    store = index.store
    first = store.open(index[1].image).read()
    shard = tmp_path / "a" / "00000.tar"
    os.replace(tmp_path / "b" / "00000.tar", shard)  # same layout, other pixels
    assert store.open(index[1].image).read() != first
    assert caption == index[1].caption_key
