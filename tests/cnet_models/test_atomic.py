"""cnet_models.atomic: a model folder is replaced whole, and durably, or not at all."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from cnet_models.atomic import replace_dir_atomically


def _fill(files: dict[str, bytes]) -> Callable[[Path], None]:
    def write(folder: Path) -> None:
        for name, data in files.items():
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).write_bytes(data)

    return write


def test_the_new_folder_replaces_the_old_and_everything_is_synced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "controlnet"
    replace_dir_atomically(out, _fill({"old.bin": b"o"}))
    synced: list[int] = []
    real = os.fsync

    def record(fd: int) -> None:
        synced.append(os.fstat(fd).st_ino)
        real(fd)

    monkeypatch.setattr(os, "fsync", record)
    replace_dir_atomically(out, _fill({"unet/weights.bin": b"w", "config.json": b"{}"}))
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == [
        "config.json",
        "unet",
        "unet/weights.bin",
    ]
    assert [p.name for p in tmp_path.iterdir()] == ["controlnet"]
    inodes = {(out / n).stat().st_ino for n in ("config.json", "unet", "unet/weights.bin", ".")}
    assert inodes <= set(synced)
    assert synced[-1] == tmp_path.stat().st_ino  # the new name, after the rename


def test_a_failed_write_leaves_the_old_folder_and_no_sibling(tmp_path: Path) -> None:
    out = tmp_path / "controlnet"
    replace_dir_atomically(out, _fill({"old.bin": b"o"}))

    def fail(folder: Path) -> None:
        (folder / "half.bin").write_bytes(b"h")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        replace_dir_atomically(out, fail)
    assert [p.name for p in out.iterdir()] == ["old.bin"]
    assert [p.name for p in tmp_path.iterdir()] == ["controlnet"]


def test_a_file_in_the_way_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "controlnet"
    out.write_text("not a folder")
    with pytest.raises(FileExistsError, match="not a folder"):
        replace_dir_atomically(out, _fill({"a": b""}))
    assert out.read_text() == "not a folder"
