"""Where an index goes: only into what cnet owns; nothing else at --out is deleted or moved."""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from cnet_data import outdir
from cnet_data.cli import main
from cnet_data.demo import run_demo
from cnet_data.index import INDEX_FILES, DatasetIndex, IndexBuilder
from cnet_data.outdir import OutputPathError
from cnet_data.scan import ScanReport


def _builder(n: int) -> IndexBuilder:
    builder = IndexBuilder()
    for i in range(n):
        builder.add(f"img/{i}.png", f"cond/{i}.png", f"caption {i}", 8, 8)
    return builder


def _index_cli(manifest: Path, out: Path, *extra: str) -> int:
    return main(["index", str(manifest), "--out", str(out), "--quiet", "--workers", "1", *extra])


def _hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_cli_refuses_a_folder_that_is_not_an_index(
    tmp_path: Path, fill_manifest: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "d"
    out.mkdir()
    (out / "precious.txt").write_text("x\n")
    assert _index_cli(fill_manifest, out) == 2
    assert (out / "precious.txt").read_text() == "x\n"
    assert sorted(p.name for p in out.iterdir()) == ["precious.txt"]
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith(f"cnet-data index: error: {out} is a folder that is not")
    assert "precious.txt" in err[0]
    assert err[1].startswith("cnet-data index: hint: choose another output folder")
    assert _hidden(tmp_path) == []
    assert not (tmp_path / "d.report.json").exists()  # refused before scanning


def test_builder_refuses_a_folder_that_is_not_an_index(tmp_path: Path) -> None:
    out = tmp_path / "d"
    (out / "sub").mkdir(parents=True)
    (out / "precious.txt").write_text("x\n")
    with pytest.raises(OutputPathError, match=r"d is a folder that is not .*precious\.txt"):
        _builder(3).write(out, root=tmp_path)
    assert sorted(p.name for p in out.iterdir()) == ["precious.txt", "sub"]
    assert _hidden(tmp_path) == []


def test_a_file_at_out_survives(
    tmp_path: Path, fill_manifest: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "f"
    out.write_text("keep me")
    assert _index_cli(fill_manifest, out) == 2
    assert out.read_text() == "keep me"
    assert f"{out} is a file" in capsys.readouterr().err
    assert _hidden(tmp_path) == []


def test_a_symlink_at_out_is_refused_and_its_target_untouched(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    link = tmp_path / "link"
    link.symlink_to(real)
    with pytest.raises(OutputPathError, match=r"link is a symbolic link"):
        _builder(1).write(link, root=tmp_path)
    assert list(real.iterdir()) == [] and link.is_symlink()


def test_an_empty_folder_is_used(tmp_path: Path) -> None:
    out = tmp_path / "empty"
    out.mkdir()
    _builder(4).write(out, root=tmp_path)
    assert len(DatasetIndex(out)) == 4
    assert {p.name for p in out.iterdir()} == INDEX_FILES
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask  # not the 0700 of a temp folder


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two_renames"])
def test_replacing_an_index_works(
    tmp_path: Path, fill_manifest: Path, monkeypatch: pytest.MonkeyPatch, exchange: bool
) -> None:
    if not exchange:
        monkeypatch.setattr(outdir, "_exchange", lambda a, b: False)
    out = tmp_path / "idx"
    _builder(3).write(out, root=tmp_path)
    assert _index_cli(fill_manifest, out) == 0
    assert len(DatasetIndex(out)) == 12
    _builder(5).write(out, root=tmp_path)
    assert len(DatasetIndex(out)) == 5
    assert _hidden(tmp_path) == []


def test_a_failed_two_step_replace_puts_the_old_index_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "idx"
    _builder(3).write(out, root=tmp_path)
    monkeypatch.setattr(outdir, "_exchange", lambda a, b: False)
    real_rename = os.rename

    def rename(src: str | Path, dst: str | Path) -> None:
        if ".cnet-staging." in str(src):
            raise OSError(errno.EIO, "Input/output error")
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError, match="Input/output error"):
        _builder(5).write(out, root=tmp_path)
    assert len(DatasetIndex(out)) == 3 and _hidden(tmp_path) == []


def test_an_index_holding_foreign_files_is_not_replaced(tmp_path: Path) -> None:
    out = tmp_path / "idx"
    _builder(3).write(out, root=tmp_path)
    (out / "notes.txt").write_text("mine")
    with pytest.raises(OutputPathError, match=r"also holds .*notes\.txt") as info:
        _builder(5).write(out, root=tmp_path)
    assert "move those out" in info.value.hint
    assert (out / "notes.txt").read_text() == "mine" and len(DatasetIndex(out)) == 3


def test_a_folder_imitating_the_marker_badly_is_not_an_index(tmp_path: Path) -> None:
    out = tmp_path / "idx"
    out.mkdir()
    (out / "index.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(OutputPathError, match="not a cnet-data index"):
        _builder(1).write(out, root=tmp_path)
    assert json.loads((out / "index.json").read_text()) == {"format": "something-else"}


_KILLED_WRITER = """
import os, sys
from pathlib import Path
from cnet_data import outdir
from cnet_data.index import IndexBuilder
outdir.commit_directory = lambda *args: os._exit(9)  # killed with the index fully staged
builder = IndexBuilder()
builder.add("a.png", "b.png", "c", 8, 8)
builder.write(Path(sys.argv[1]), root=Path(sys.argv[1]).parent)
"""


def test_a_killed_writers_staging_folder_is_cleaned_at_the_next_write(tmp_path: Path) -> None:
    out = tmp_path / "idx"
    run = subprocess.run([sys.executable, "-c", _KILLED_WRITER, str(out)], check=False)
    assert run.returncode == 9
    [left] = _hidden(tmp_path)
    assert left.startswith(f".idx.cnet-staging.{socket.gethostname()}.")
    assert (tmp_path / left / "index.json").exists() and not out.exists()
    _builder(2).write(out, root=tmp_path)
    assert _hidden(tmp_path) == [] and len(DatasetIndex(out)) == 2


def test_only_dead_writers_leftovers_of_the_same_target_are_cleaned(tmp_path: Path) -> None:
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    pid, host = int(dead.stdout), socket.gethostname()
    names = {
        "killed_staging": f".idx.cnet-staging.{host}.{pid}.0a1b2c3d",
        "killed_retired": f".idx.cnet-old.{host}.{pid}.0a1b2c3e",
        "live_writer": f".idx.cnet-staging.{host}.{os.getpid()}.0a1b2c3f",
        "other_host": f".idx.cnet-staging.elsewhere.{pid}.0a1b2c40",
        "other_target": f".idx2.cnet-staging.{host}.{pid}.0a1b2c41",
        "with_foreign": f".idx.cnet-staging.{host}.{pid}.0a1b2c42",
    }
    for name in names.values():
        (tmp_path / name).mkdir()
        (tmp_path / name / "sizes.npy").write_bytes(b"x")
    (tmp_path / names["with_foreign"] / "mine.txt").write_text("keep")
    _builder(1).write(tmp_path / "idx", root=tmp_path)
    kept = {"live_writer", "other_host", "other_target", "with_foreign"}
    assert _hidden(tmp_path) == sorted(names[k] for k in kept)
    assert [p.name for p in (tmp_path / names["with_foreign"]).iterdir()] == ["mine.txt"]


def test_the_report_replaces_only_a_report(
    tmp_path: Path, fill_manifest: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    notes = tmp_path / "notes.json"
    notes.write_text('{"mine": true}')
    assert _index_cli(fill_manifest, tmp_path / "idx", "--report", str(notes)) == 2
    assert notes.read_text() == '{"mine": true}' and not (tmp_path / "idx").exists()
    assert f"{notes} exists and is not a cnet-data scan report" in capsys.readouterr().err
    assert _index_cli(fill_manifest, tmp_path / "idx") == 0
    assert _index_cli(fill_manifest, tmp_path / "idx") == 0  # its own report is replaced
    with pytest.raises(OutputPathError):
        ScanReport(source="x").write(tmp_path / "idx")  # a folder, not a report


def test_the_demo_refuses_a_folder_that_is_not_a_demo(tmp_path: Path) -> None:
    (tmp_path / "precious.txt").write_text("x")
    with pytest.raises(OutputPathError, match=r"precious\.txt"):
        run_demo(tmp_path, samples=4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["precious.txt"]
