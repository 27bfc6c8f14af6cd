"""The cnet-data console script."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cnet_data.cli import main
from cnet_data.index import DatasetIndex


def test_help_does_not_import_heavy_modules() -> None:
    code = (
        "import sys\n"
        "from cnet_data.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in ('torch', 'numpy', 'PIL', 'tqdm') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "index" in out.stdout and "buckets" in out.stdout
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_index_then_buckets(
    tmp_path: Path, fill_manifest: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "idx"
    assert main(["index", str(fill_manifest), "--out", str(out), "--quiet", "--workers", "1"]) == 0
    assert len(DatasetIndex(out)) == 12
    report = json.loads((tmp_path / "idx.report.json").read_text())
    assert report["accepted"] == 12 and report["bad"] == 0
    png = tmp_path / "hist.png"
    assert (
        main(
            [
                "buckets",
                str(out),
                "--area",
                "4096",
                "--min-side",
                "32",
                "--max-side",
                "128",
                "--step",
                "16",
                "--png",
                str(png),
                "--global-batch",
                "8",
            ]
        )
        == 0
    )
    table = capsys.readouterr().out
    assert "64x64" in table and "3 populated buckets, 12 samples" in table
    assert png.read_bytes().startswith(b"\x89PNG")


def test_index_fail_keeps_the_old_index_and_writes_the_report(
    tmp_path: Path, fill_manifest: Path, bad_corpus: Path
) -> None:
    out = tmp_path / "idx"
    assert main(["index", str(fill_manifest), "--out", str(out), "--quiet"]) == 0
    code = main(["index", str(bad_corpus), "--out", str(out), "--quiet", "--max-pixels", "1000000"])
    assert code == 1
    assert len(DatasetIndex(out)) == 12  # untouched
    assert json.loads((tmp_path / "idx.report.json").read_text())["bad"] == 12
    code = main(
        [
            "index",
            str(bad_corpus),
            "--out",
            str(out),
            "--quiet",
            "--on-bad",
            "skip",
            "--max-pixels",
            "1000000",
        ]
    )
    assert code == 0 and len(DatasetIndex(out)) == 3


def test_check_exit_codes(
    bad_corpus: Path, fill_manifest: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["check", str(fill_manifest), "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out)["accepted"] == 12
    assert main(["check", str(bad_corpus), "--quiet", "--max-pixels", "1000000"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["bad"] == 12 and len(report["bad_samples"]) == 12
    assert (
        main(["check", str(bad_corpus), "--quiet", "--on-bad", "skip", "--max-pixels", "1000000"])
        == 0
    )


def test_errors_name_the_problem(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", str(tmp_path / "missing.jsonl"), "--quiet"]) == 2
    assert "missing.jsonl does not exist" in capsys.readouterr().err
    assert main(["buckets", str(tmp_path)]) == 2
    assert "no index.json" in capsys.readouterr().err


def test_demo(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--out", str(tmp_path / "demo"), "--samples", "12"]) == 0
    printed = capsys.readouterr().out
    assert "12 accepted" in printed
    for name in ("batch.png", "buckets.png", "index/index.json"):
        assert (tmp_path / "demo" / name).exists()
