"""`ShardWriter`: writes samples as WebDataset-style tar shards, the layout the `tar` source reads.

Each sample is a group of members named `KEY.EXTENSION` (`000123.jpg`, `000123.cond.png`,
`000123.txt`, `000123.json`), as img2dataset writes them; a new shard starts every
`samples_per_shard` samples. Each shard is written to a temporary file and renamed when it is
complete, so a reader (or an interrupted writer's relaunch) never sees half a shard.
"""

from __future__ import annotations

import contextlib
import io
import tarfile
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType

from cnet_data.atomic import atomic_open


class ShardWriter:
    """Appends samples to `folder/NNNNN.tar` shards; use as a context manager."""

    def __init__(self, folder: Path, *, samples_per_shard: int = 1000) -> None:
        if samples_per_shard < 1:
            raise ValueError(f"samples_per_shard must be at least 1, got {samples_per_shard}")
        self.folder = Path(folder)
        if self.folder.is_dir() and next(self.folder.glob("*.tar"), None) is not None:
            # Numbering starts at 00000: shards of an earlier, longer run would stay beside.
            raise ValueError(f"{self.folder} already holds .tar shards; write into a new folder")
        self.samples_per_shard = samples_per_shard
        self.shards: list[Path] = []
        """The shards completed so far, in order."""
        self._in_shard = 0
        self._open: tuple[contextlib.ExitStack[bool | None], tarfile.TarFile] | None = None

    def add(self, key: str, members: Mapping[str, bytes]) -> None:
        """Write one sample: `members` maps an extension (`jpg`, `cond.png`) to its bytes."""
        if not key or "." in key.rpartition("/")[2]:
            raise ValueError(f"a sample key needs a name without dots, got {key!r}")
        tar = self._tar()
        for extension, data in members.items():
            info = tarfile.TarInfo(f"{key}.{extension}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        self._in_shard += 1
        if self._in_shard == self.samples_per_shard:
            self._finish()

    def _tar(self) -> tarfile.TarFile:
        if self._open is None:
            self.folder.mkdir(parents=True, exist_ok=True)
            path = self.folder / f"{len(self.shards):05d}.tar"
            stack = contextlib.ExitStack()
            fh = stack.enter_context(atomic_open(path))  # renamed into place when closed
            tar = tarfile.TarFile(fileobj=fh, mode="w", format=tarfile.GNU_FORMAT)
            stack.enter_context(tar)
            self._open = (stack, tar)
            self.shards.append(path)
        return self._open[1]

    def _finish(self, error: BaseException | None = None) -> None:
        if self._open is None:
            return
        stack, _tar = self._open
        self._open, self._in_shard = None, 0
        if error is None:
            stack.close()
        else:  # the staged file is discarded: no half shard is left under its name
            self.shards.pop()
            stack.__exit__(type(error), error, error.__traceback__)

    def close(self) -> None:
        """Complete the shard being written (a last, shorter one)."""
        self._finish()

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self._finish(error)
