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


@pytest.mark.parametrize("command", ["index", "check", "buckets"])
def test_help_states_the_config_and_its_precedence(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--config RUN.yaml" in text
    assert "a flag given on the command line wins over --config RUN.yaml" in text
    assert "sd15 512x512" in text


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
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("cnet-data check: error: dataset source") and "missing.jsonl" in err[0]
    assert err[1].startswith("cnet-data check: hint: give the path of a JSONL manifest")
    assert main(["buckets", str(tmp_path)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert "no index.json" in err[0] and "cnet-data index SOURCE --out DIR" in err[1]


def test_bad_samples_end_in_one_error_line_and_a_hint(
    tmp_path: Path, bad_corpus: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["index", str(bad_corpus), "--out", str(tmp_path / "i"), "--quiet"])
    assert code == 1
    err = capsys.readouterr().err.splitlines()
    assert err[0] == f"report: {tmp_path / 'i.report.json'}"
    assert err[1].startswith("cnet-data index: error: 11 bad sample(s)")
    assert err[2].startswith("cnet-data index: hint:") and "--on-bad skip" in err[2]
    assert "Traceback" not in "\n".join(err)


def _break_index_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(self: DatasetIndex, directory: Path, *, root: Path | None = None) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(DatasetIndex, "__init__", boom)


def test_an_unexpected_error_is_one_line_without_debug(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _break_index_loading(monkeypatch)
    assert main(["buckets", str(tmp_path)]) == 1
    captured = capsys.readouterr()
    err = captured.err.splitlines()
    assert len(err) == 2 and captured.out == ""
    assert err[0].startswith("cnet-data buckets: error: unexpected RuntimeError: boom at ")
    assert err[1] == (
        "cnet-data buckets: hint: rerun with --debug for the traceback, and report it if the "
        "input looks right"
    )


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_prints_the_traceback_too(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    where: str,
) -> None:
    _break_index_loading(monkeypatch)
    argv = ["buckets", str(tmp_path)]
    argv = ["--debug", *argv] if where == "before" else [*argv, "--debug"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("Traceback (most recent call last)")
    assert 'raise RuntimeError("boom")' in err
    assert "cnet-data buckets: error: unexpected RuntimeError: boom" in err


def test_ctrl_c_is_reported_as_interrupted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def interrupt(self: DatasetIndex, directory: Path, *, root: Path | None = None) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(DatasetIndex, "__init__", interrupt)
    assert main(["buckets", str(tmp_path)]) == 130
    assert capsys.readouterr().err == "cnet-data buckets: interrupted\n"


def test_demo(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--out", str(tmp_path / "demo"), "--samples", "12"]) == 0
    printed = capsys.readouterr().out
    assert "12 accepted" in printed
    for name in ("batch.png", "buckets.png", "index/index.json"):
        assert (tmp_path / "demo" / name).exists()
