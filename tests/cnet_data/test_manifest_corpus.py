"""Malformed manifests: every bad line costs only itself, is named by its line, never crashes.

Each corpus entry is one bad manifest line, put between good lines: the scan must report it at
its line number with a reason, and index the good samples around it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cnet_data.index import DatasetIndex
from cnet_data.jsonlines import MAX_LINE_BYTES
from cnet_data.scan import BadSamplesError, NoSamplesError, ScanConfig, ScanReport, scan
from cnet_data.sources import SourceConfig
from cnet_data.synthetic import write_fill_dataset

DEEP = 200_000
SKIP = ScanConfig(on_bad="skip", workers=1)


def _line(
    image: object = "images/000000.png",
    cond: object = "conditioning/000000.png",
    text: object = "a caption",
    **extra: object,
) -> bytes:
    record = {"image": image, "conditioning_image": cond, "text": text, **extra}
    return json.dumps(record).encode()


# (id, bad line, kind, a phrase its reason must hold)
CORPUS: list[tuple[str, bytes, str, str]] = [
    (
        "invalid_utf8_path",
        _line().replace(b"000000.png", b"\xff\xfe.png", 1),
        "manifest_error",
        "not valid UTF-8",
    ),
    (
        "latin1_caption",
        _line(text="caf").replace(b'caf"', b'caf\xe9"'),
        "manifest_error",
        "not valid UTF-8",
    ),
    (
        "json_array",
        b'["images/000000.png", "conditioning/000000.png"]',
        "manifest_error",
        "got array",
    ),
    ("json_string", b'"images/000000.png"', "manifest_error", "got string"),
    ("json_number", b"42", "manifest_error", "got number"),
    ("json_null", b"null", "manifest_error", "got null"),
    ("json_boolean", b"true", "manifest_error", "got boolean"),
    ("deep_array", b"[" * DEEP + b"]" * DEEP, "manifest_error", "levels deep"),
    (
        "deep_value",
        _line()[:-1] + b', "meta": ' + b"[" * DEEP + b"]" * DEEP + b"}",
        "manifest_error",
        "levels deep",
    ),
    ("truncated", _line()[:25], "manifest_error", "not valid JSON"),
    ("trailing_garbage", _line() + b" x", "manifest_error", "not valid JSON"),
    ("python_dict", b"{'image': 'images/000000.png'}", "manifest_error", "not valid JSON"),
    ("bom_mid_file", b"\xef\xbb\xbf" + _line(), "manifest_error", "not valid JSON"),
    (
        "missing_image",
        json.dumps({"conditioning_image": "c.png", "text": "t"}).encode(),
        "manifest_error",
        "missing key(s) 'image'",
    ),
    ("image_not_string", _line(image=7), "manifest_error", "image path is a JSON number"),
    (
        "conditioning_is_array",
        _line(cond=["a.png"]),
        "manifest_error",
        "conditioning image path is a JSON array",
    ),
    ("image_empty", _line(image=""), "manifest_error", "image path is empty"),
    ("caption_number", _line(text=42), "caption_not_text", "caption is int"),
    ("caption_null", _line(text=None), "caption_not_text", "caption is NoneType"),
    ("caption_surrogate", _line(text="\ud800"), "caption_not_text", "unpaired surrogate"),
    ("path_surrogate", _line(image="\udcff.png"), "manifest_error", "unpaired surrogate"),
    ("path_escapes", _line(image="../../etc/passwd"), "path_outside_root", "leaves the dataset"),
    ("path_absolute", _line(cond="/etc/passwd"), "path_outside_root", "leaves the dataset"),
    ("raw_nul_byte", _line().replace(b"000000.png", b"0\x00.png", 1), "manifest_error", "NUL byte"),
    ("escaped_nul", _line(image="images/0\x00.png"), "manifest_error", "NUL character"),
    (
        "duplicate_key",
        _line()[:-1] + b', "image": "images/000001.png"}',
        "manifest_error",
        "appears more than once",
    ),
    (
        "huge_integer",
        _line(image=0).replace(b"0", b"9" * 5000),
        "manifest_error",
        "not usable JSON",
    ),
    ("extremely_long", _line(text="x" * (2 * MAX_LINE_BYTES)), "manifest_error", "bytes long"),
    ("missing_file", _line(image="images/nowhere.png"), "missing_file", "does not exist"),
]


@pytest.fixture
def dataset(tmp_path: Path) -> tuple[Path, list[bytes]]:
    """A dataset folder and its good manifest lines (three samples)."""
    manifest = write_fill_dataset(tmp_path / "d", 3)
    return manifest.parent, manifest.read_bytes().splitlines()


def _scan(path: Path, config: ScanConfig = SKIP) -> tuple[DatasetIndex, ScanReport]:
    builder, report = scan(SourceConfig(path), config, progress=False)
    builder.write(path.parent / "index", root=path.parent)
    return DatasetIndex(path.parent / "index"), report


@pytest.mark.parametrize(
    ("bad", "kind", "phrase"), [c[1:] for c in CORPUS], ids=[c[0] for c in CORPUS]
)
def test_a_bad_line_is_reported_at_its_number_and_the_rest_indexed(
    dataset: tuple[Path, list[bytes]], bad: bytes, kind: str, phrase: str
) -> None:
    root, good = dataset
    manifest = root / "m.jsonl"
    manifest.write_bytes(b"\n".join([good[0], bad, good[1], good[2]]) + b"\n")
    index, report = _scan(manifest)
    assert [(b.where, b.kind) for b in report.bad] == [("m.jsonl:2", kind)]
    assert phrase in report.bad[0].reason
    assert len(index) == report.accepted == 3
    assert [index[i].image for i in range(3)] == [f"images/00000{i}.png" for i in range(3)]
    report.write(root / "report.json")  # every reason survives the trip to JSON
    assert json.loads((root / "report.json").read_text())["bad_samples"][0]["where"] == "m.jsonl:2"


def test_every_bad_line_of_a_mixed_manifest_is_named(dataset: tuple[Path, list[bytes]]) -> None:
    root, good = dataset
    lines, expected = [], {}
    for i, (_, bad, kind, _) in enumerate(CORPUS):
        lines += [good[i % 3], bad]
        expected[f"m.jsonl:{2 * i + 2}"] = kind
    manifest = root / "m.jsonl"
    manifest.write_bytes(b"\n".join(lines))
    index, report = _scan(manifest)
    assert {b.where: b.kind for b in report.bad} == expected
    assert len(index) == len(CORPUS)
    with pytest.raises(BadSamplesError, match=r"first: m\.jsonl:2 ") as info:
        scan(SourceConfig(manifest), ScanConfig(workers=1), progress=False)
    assert len(info.value.report.bad) == len(CORPUS)


def test_a_first_line_holding_a_json_array_is_one_bad_line(
    dataset: tuple[Path, list[bytes]],
) -> None:
    root, good = dataset
    manifest = root / "m.jsonl"
    manifest.write_bytes(b"\n".join([b"[1, 2]", *good]))
    index, report = _scan(manifest)
    assert [(b.where, b.reason) for b in report.bad] == [
        ("m.jsonl:1", "expected a JSON object, got array [1, 2]")
    ]
    assert len(index) == 3


def test_tolerated_layouts(dataset: tuple[Path, list[bytes]]) -> None:
    # A BOM, CRLF endings, blank and whitespace-only lines, no final newline: all fine.
    root, good = dataset
    manifest = root / "m.jsonl"
    body = b"\xef\xbb\xbf" + good[0] + b"\r\n\r\n   \t\r\n" + good[1] + b"\r\n\n" + good[2]
    manifest.write_bytes(body)
    index, report = _scan(manifest, ScanConfig(workers=1))
    assert report.bad == [] and len(index) == 3
    assert (report.lines_read, report.blank_lines) == (6, 3)
    assert index.store.describe(index[0].image) == str(root / "images" / "000000.png")


def test_a_whole_file_json_array_is_read_as_items(dataset: tuple[Path, list[bytes]]) -> None:
    root, good = dataset
    items = [json.loads(line) for line in good]
    manifest = root / "m.json"
    manifest.write_text(json.dumps([items[0], "junk", items[1], items[2]], indent=2))
    index, report = _scan(manifest)
    assert [(b.where, b.reason) for b in report.bad] == [
        ("m.json[1]", "expected a JSON object, got string")
    ]
    assert len(index) == 3


def test_a_broken_json_array_names_the_line(dataset: tuple[Path, list[bytes]]) -> None:
    root, good = dataset
    manifest = root / "m.json"
    manifest.write_text("[\n" + good[0].decode() + ",\n" + good[1].decode() + "\n")  # no "]"
    with pytest.raises(NoSamplesError, match=r"m\.json:4: not a valid JSON array") as info:
        scan(SourceConfig(manifest), SKIP, progress=False)
    assert info.value.report.counts_by_kind() == {"manifest_error": 1}


@pytest.mark.parametrize(
    ("content", "counts"),
    [
        (b"", "0 line(s) read (0 blank), 0 accepted, 0 rejected"),
        (b"\n \n\r\n", "3 line(s) read (3 blank), 0 accepted, 0 rejected"),
        (b"{}\n42\n", "2 line(s) read (0 blank), 0 accepted, 2 rejected (manifest_error: 2)"),
    ],
    ids=["empty", "blank_only", "all_bad"],
)
def test_a_manifest_without_one_usable_sample_is_an_error(
    tmp_path: Path, content: bytes, counts: str
) -> None:
    manifest = tmp_path / "m.jsonl"
    manifest.write_bytes(content)
    for on_bad in ("skip", "fail"):
        with pytest.raises(NoSamplesError, match="no usable sample") as info:
            scan(SourceConfig(manifest), ScanConfig(on_bad=on_bad, workers=1), progress=False)
        assert counts in str(info.value)
        assert info.value.hint


def test_missing_keys_everywhere_hint_at_the_key_options(tmp_path: Path) -> None:
    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"file": "a.png", "hint": "b.png", "caption": "c"}\n')
    with pytest.raises(NoSamplesError) as info:
        scan(SourceConfig(manifest), SKIP, progress=False)
    assert "missing key(s) 'image', 'conditioning_image', 'text'" in str(info.value)
    assert "--image-key" in info.value.hint


def test_an_empty_prompt_json_or_folder_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "prompt.json").write_text("\n")
    with pytest.raises(NoSamplesError, match=r"1 line\(s\) read \(1 blank\)"):
        scan(SourceConfig(tmp_path / "prompt.json"), SKIP, progress=False)
    for sub in ("images", "conditioning"):
        (tmp_path / "pairs" / sub).mkdir(parents=True)
    with pytest.raises(NoSamplesError, match=r"0 image\(s\) found, 0 accepted"):
        scan(SourceConfig(tmp_path / "pairs"), SKIP, progress=False)
