"""Sources and scanning: the three layouts, every bad-sample kind, skip and fail."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cnet_data.errors import CnetError
from cnet_data.index import DatasetIndex
from cnet_data.scan import BadSamplesError, ScanConfig, scan
from cnet_data.sources import SourceConfig, SourceError, inside_root
from cnet_data.synthetic import write_fill_dataset

# The module, not the function `cnet_data.scan` the package exports under the same name.
scan_module = importlib.import_module("cnet_data.scan")

# What scanning the corpus must report, exactly.
EXPECTED_BAD = {
    "caption_not_text": 2,
    "decompression_bomb": 1,
    "empty_file": 1,
    "manifest_error": 2,
    "missing_file": 1,
    "path_outside_root": 2,
    "size_mismatch": 1,
    "truncated": 1,
    "unreadable": 1,
}
EXPECTED_GOOD = 3
EXPECTED_EMPTY_CAPTIONS = 1
BOMB_LIMIT = 1_000_000  # the corpus bomb declares 2000x2000


@pytest.mark.parametrize("workers", [1, 2])
def test_bad_corpus_is_reported_with_exact_counts(
    tmp_path: Path, bad_corpus: Path, workers: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    manifest = bad_corpus
    monkeypatch.setattr(scan_module, "_CHUNK", 3)  # several chunks: the process pool runs
    config = ScanConfig(max_pixels=BOMB_LIMIT, on_bad="skip", workers=workers)
    builder, report = scan(SourceConfig(manifest), config, progress=False)
    assert report.counts_by_kind() == EXPECTED_BAD
    assert report.accepted == len(builder) == EXPECTED_GOOD
    assert report.empty_captions == EXPECTED_EMPTY_CAPTIONS
    assert report.total == EXPECTED_GOOD + sum(EXPECTED_BAD.values())
    by_where = {b.where: b for b in report.bad}
    assert by_where["manifest.jsonl:5"].kind == "truncated"
    assert "cut.jpg" in by_where["manifest.jsonl:5"].reason
    assert "40x32" in by_where["manifest.jsonl:8"].reason

    builder.write(tmp_path / "index", root=manifest.parent)
    index = DatasetIndex(tmp_path / "index")
    assert [index.caption(i) for i in range(3)] == ["a red circle", "", "a blue square"]

    report.write(tmp_path / "report.json")
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["bad_by_kind"] == EXPECTED_BAD
    assert len(saved["bad_samples"]) == sum(EXPECTED_BAD.values())
    assert all(s["reason"] and s["where"] for s in saved["bad_samples"])


def test_fail_mode_raises_with_the_whole_report(bad_corpus: Path) -> None:
    manifest = bad_corpus
    config = ScanConfig(max_pixels=BOMB_LIMIT, on_bad="fail", workers=1)
    with pytest.raises(BadSamplesError, match="12 bad sample") as info:
        scan(SourceConfig(manifest), config, progress=False)
    assert info.value.report.counts_by_kind() == EXPECTED_BAD


def test_decode_verification_catches_what_headers_cannot(tmp_path: Path) -> None:
    # A BMP carries no end marker: header mode decodes it fully, so its truncation is found.
    root = tmp_path / "bmp"
    root.mkdir()
    Image.new("RGB", (32, 32), "red").save(root / "a.bmp")
    data = (root / "a.bmp").read_bytes()
    (root / "cut.bmp").write_bytes(data[:-500])
    Image.new("RGB", (32, 32)).save(root / "c.png")
    manifest = root / "m.jsonl"
    manifest.write_text(
        json.dumps({"image": "cut.bmp", "conditioning_image": "c.png", "text": "x"})
        + "\n"
        + json.dumps({"image": "a.bmp", "conditioning_image": "c.png", "text": "whole"})
    )
    for verify in ("header", "decode"):
        _, report = scan(
            SourceConfig(manifest),
            ScanConfig(on_bad="skip", verify=verify, workers=1),
            progress=False,
        )
        assert report.counts_by_kind() == {"truncated": 1}, verify


def test_folder_layout_with_sidecars(tmp_path: Path) -> None:
    root = tmp_path / "pairs"
    write_fill_dataset(root, 6, sidecars=True)
    (root / "images" / "000001.txt").unlink()
    (root / "images" / "000002.txt").write_bytes(b"\xff\xfe bad utf-8")
    (root / "conditioning" / "000003.png").unlink()
    (root / "images" / "000004.jpg").write_bytes((root / "images" / "000004.png").read_bytes())
    _, report = scan(SourceConfig(root), ScanConfig(on_bad="skip", workers=1), progress=False)
    assert report.counts_by_kind() == {
        "ambiguous_pair": 1,
        "caption_missing": 1,
        "caption_not_text": 1,
        "missing_file": 1,
    }
    assert report.accepted == 2


def test_prompt_json_layout(tmp_path: Path) -> None:
    root = tmp_path / "fill50k"
    (root / "source").mkdir(parents=True)
    (root / "target").mkdir()
    lines = []
    for i in range(4):
        Image.new("RGB", (32, 24), (i, 0, 0)).save(root / "source" / f"{i}.png")
        Image.new("RGB", (32, 24), (0, i, 0)).save(root / "target" / f"{i}.png")
        lines.append(
            json.dumps(
                {"source": f"source/{i}.png", "target": f"target/{i}.png", "prompt": f"p{i}"}
            )
        )
    (root / "prompt.json").write_text("\n".join(lines))
    builder, report = scan(
        SourceConfig(root / "prompt.json"), ScanConfig(workers=1), progress=False
    )
    builder.write(tmp_path / "index", root=root)
    index = DatasetIndex(tmp_path / "index")
    assert report.accepted == 4
    assert (index[2].image, index[2].conditioning) == ("target/2.png", "source/2.png")
    assert index.store.describe(index[2].conditioning) == str(root / "source" / "2.png")
    assert index[2].caption == "p2"
    assert index[2].size == (24, 32)


def test_manifest_as_json_array_and_custom_keys(tmp_path: Path) -> None:
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    records = [{"img": "a.png", "hint": "a.png", "caption": "c"}]
    (tmp_path / "m.json").write_text(json.dumps(records))
    source = SourceConfig(
        tmp_path / "m.json",
        format="jsonl",
        image_key="img",
        conditioning_key="hint",
        caption_key="caption",
    )
    _, report = scan(source, ScanConfig(workers=1), progress=False)
    assert report.accepted == 1


def test_paths_cannot_leave_the_root(tmp_path: Path) -> None:
    root = tmp_path / "data"
    assert inside_root(root, "a/b.png") == "a/b.png"
    assert inside_root(root, "a/../b.png") == "b.png"
    assert inside_root(root, f"{root}/x.png") == "x.png"
    for escape in ("../x.png", "a/../../x.png", "/etc/passwd", "", ".", str(tmp_path / "x")):
        assert inside_root(root, escape) is None, escape


def test_missing_source_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist") as info:
        scan(SourceConfig(tmp_path / "nope.jsonl"), progress=False)
    assert isinstance(info.value, CnetError) and info.value.hint
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(FileNotFoundError, match="images/"):
        scan(SourceConfig(tmp_path / "empty_dir"), progress=False)
    with pytest.raises(SourceError, match="is a folder"):
        scan(SourceConfig(tmp_path / "empty_dir", format="jsonl"), progress=False)


def test_cnet_data_errors_keep_their_old_bases(bad_corpus: Path, tmp_path: Path) -> None:
    # Callers catching ValueError (bad input) keep working; run_reporting sees a CnetError.
    with pytest.raises(ValueError, match="bad sample") as info:
        scan(SourceConfig(bad_corpus), ScanConfig(workers=1), progress=False)
    assert isinstance(info.value, CnetError) and "--on-bad skip" in info.value.hint
    with pytest.raises(ValueError, match="not a dataset index") as bad_index:
        DatasetIndex(tmp_path)
    assert isinstance(bad_index.value, CnetError) and bad_index.value.exit_code == 2


def test_index_sizes_follow_headers(tmp_path: Path) -> None:
    manifest = write_fill_dataset(tmp_path / "d", 9, sizes=[(40, 24), (24, 40), (32, 32)])
    builder, _ = scan(SourceConfig(manifest), ScanConfig(workers=1), progress=False)
    builder.write(tmp_path / "i", root=manifest.parent)
    index = DatasetIndex(tmp_path / "i")
    assert index.sizes.tolist() == [[24, 40], [40, 24], [32, 32]] * 3
    assert np.array_equal(index.widths, [40, 24, 32] * 3)
