"""cnet_data.atomic: the one writer of cnet-data and cnet-train (fsync, rename, fsync folder)."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from cnet_data import atomic


@pytest.fixture
def synced(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The inode of everything fsynced, in order."""
    inodes: list[int] = []
    real = os.fsync

    def record(fd: int) -> None:
        inodes.append(os.fstat(fd).st_ino)
        real(fd)

    monkeypatch.setattr(os, "fsync", record)
    return inodes


def _inode(path: Path) -> int:
    return path.stat().st_ino


def test_atomic_write_replaces_the_file_and_syncs_it_then_its_folder(
    tmp_path: Path, synced: list[int]
) -> None:
    path = tmp_path / "sub" / "report.json"
    atomic.atomic_write_text(path, "old")
    synced.clear()
    atomic.atomic_write_text(path, "new")
    assert path.read_text() == "new"
    assert synced == [_inode(path), _inode(path.parent)]
    assert sorted(p.name for p in path.parent.iterdir()) == ["report.json"]


def test_a_failed_atomic_write_keeps_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "report.json"
    path.write_text("old")

    def half_then_fail() -> None:
        with atomic.atomic_open(path) as fh:
            fh.write(b"half")
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        half_then_fail()
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]


def test_publish_once_keeps_the_first_writers_file(tmp_path: Path, synced: list[int]) -> None:
    path = tmp_path / "header.json"
    atomic.publish_once(path, b"first")
    assert synced[-1] == _inode(tmp_path)
    atomic.publish_once(path, b"second")
    assert path.read_bytes() == b"first"
    assert [p.name for p in tmp_path.iterdir()] == ["header.json"]


def test_publish_once_without_hard_links_falls_back_to_a_replace(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_links(src: str, dst: Path) -> None:
        raise PermissionError(errno.EPERM, "no hard links here")

    monkeypatch.setattr(os, "link", no_links)
    path = tmp_path / "header.json"
    atomic.publish_once(path, b"only")
    assert path.read_bytes() == b"only"
    assert [p.name for p in tmp_path.iterdir()] == ["header.json"]


def test_write_durably_creates_and_syncs_but_never_overwrites(
    tmp_path: Path, synced: list[int]
) -> None:
    path = tmp_path / "samples.npy"
    atomic.write_durably(path, lambda fh: fh.write(b"data"))
    assert path.read_bytes() == b"data"
    assert synced == [_inode(path)]
    with pytest.raises(FileExistsError):
        atomic.write_durably(path, lambda fh: fh.write(b"other"))
    assert path.read_bytes() == b"data"


def test_rename_durably_moves_a_synced_tree_and_syncs_the_new_names_folder(
    tmp_path: Path, synced: list[int]
) -> None:
    partial = tmp_path / ".out.partial"
    (partial / "inner").mkdir(parents=True)
    (partial / "inner" / "weights.bin").write_bytes(b"w")
    atomic.fsync_tree(partial)
    expected = {_inode(partial), _inode(partial / "inner"), _inode(partial / "inner/weights.bin")}
    assert set(synced) == expected
    synced.clear()
    atomic.rename_durably(partial, tmp_path / "out")
    assert (tmp_path / "out" / "inner" / "weights.bin").read_bytes() == b"w"
    assert synced == [_inode(tmp_path)]


@pytest.mark.parametrize("code", [errno.EINVAL, errno.ENOTSUP])
def test_a_folder_the_filesystem_cannot_sync_is_accepted_but_a_file_is_not(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    def cannot(fd: int) -> None:
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, "fsync", cannot)
    atomic.fsync_path(tmp_path)
    file = tmp_path / "f"
    file.write_bytes(b"")
    with pytest.raises(OSError, match=os.strerror(code)):
        atomic.fsync_path(file)


def test_a_failing_fsync_of_the_data_fails_the_write_and_keeps_the_old_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "report.json"
    path.write_text("old")

    def disk_full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space"):
        atomic.atomic_write_text(path, "new")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]
