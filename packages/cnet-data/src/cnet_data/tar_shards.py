"""The `tar` source: WebDataset-style tar shards, read by byte range.

A shard is an uncompressed tar whose members are grouped into samples by key, as img2dataset
and webdataset write them: `000123.jpg`, `000123.cond.png`, `000123.txt`, `000123.json` (its
`width` and `height` are the sample's size under the scan's `verify: metadata`; other members
are passed over). The key is the member's path up to the first dot of its file
name; what follows is the member's extension. Per sample, the image is the one member with an
image extension other than the conditioning extension (`SourceConfig.conditioning_extension`,
`cond.png` by default), the caption is `KEY` + `caption_suffix` (`.txt`).

The index keeps each member as `SHARD:OFFSET:SIZE:NAME` (`TarShards.reference`), so training
reads a member with one seek and one read, and the bucket sampler keeps random access and its
exact resume: nothing is streamed. Compressed shards (`.tar.gz`) have no byte offsets to seek
to and are refused with that reason.

With `SourceConfig.url` the shards are at an fsspec URL (`s3://bucket/shards`): the index is
the same, and a member is one ranged request, through a bounded local read-through cache under
`path` when `read_cache_gib` is set (`cnet_data.remote_reads`).
"""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
import threading
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO, BinaryIO

import attrs

from cnet_data import remote_reads
from cnet_data.jsonlines import LineCount
from cnet_data.source_protocol import SourceRecord, header_root
from cnet_data.sources import IMAGE_SUFFIXES, SourceConfig, SourceError, is_utf8, require_exists

STORE_KIND = "tar"
"""The name `TarShards` is registered under, and written in an index's header."""
SHARD_SUFFIX = ".tar"
# A shard path never holds a ":" (the source refuses such a shard), so the first one ends
# it; it is empty when the one shard is the whole `url`.
_REFERENCE = re.compile(r"(?P<shard>[^:]*):(?P<offset>\d+):(?P<size>\d+):(?P<name>.+)", re.S)


@attrs.frozen
class Member:
    """Where one tar member's bytes are: its shard (relative to the root) and byte range."""

    shard: str
    offset: int
    size: int
    name: str
    """The member's path inside the shard, for people."""


@attrs.frozen
class TarShards:
    """Members are byte ranges of shards under `root`, named by `reference`."""

    root: Path
    """The folder holding the shards, absolute; with `url`, the local folder of the cache."""
    url: str | None = None
    """Where the shards are when they are not under `root`: an fsspec URL."""
    cache_bytes: int = 0
    """With `url`: the bound of the read-through cache under `root` (0: no cache)."""

    @property
    def kind(self) -> str:
        return STORE_KIND

    @staticmethod
    def reference(member: Member) -> str:
        return f"{member.shard}:{member.offset}:{member.size}:{member.name}"

    @staticmethod
    def member(reference: str) -> Member:
        """The member a reference names; `ValueError` when it is not one."""
        found = _REFERENCE.fullmatch(reference)
        if found is None:
            raise ValueError(f"{reference!r} is not a tar member (SHARD:OFFSET:SIZE:NAME)")
        return Member(found["shard"], int(found["offset"]), int(found["size"]), found["name"])

    def open(self, reference: str) -> BinaryIO:
        member = self.member(reference)
        data = self._read(member)
        if len(data) != member.size:
            raise OSError(
                f"{self._shard_name(member)} gave {len(data)} bytes of member {member.name}, "
                f"indexed as {member.size} (the shard changed since it was indexed?)"
            )
        return io.BytesIO(data)

    def _shard_name(self, member: Member) -> str:
        if self.url is None:
            return str(self.root / member.shard)
        return remote_reads.join(self.url, member.shard)

    def _read(self, member: Member) -> bytes:
        if self.url is None:
            return _pread_member(self.root / member.shard, member.size, member.offset)
        url = self._shard_name(member)

        def fetch() -> bytes:
            return remote_reads.ranged_read(url, member.offset, member.size)

        if self.cache_bytes <= 0:
            return fetch()
        key = f"{url}:{member.offset}:{member.size}"
        return _cache(self.root, self.cache_bytes).read(key, fetch, member.size)

    def describe(self, reference: str) -> str:
        member = self.member(reference)
        return f"{self._shard_name(member)} member {member.name}"

    def relocated(self, root: Path) -> TarShards:
        return attrs.evolve(self, root=Path(root).absolute())

    def header(self) -> Mapping[str, object]:
        remote = {} if self.url is None else {"url": self.url, "cache_bytes": self.cache_bytes}
        return {"kind": STORE_KIND, "root": str(self.root), **remote}

    @classmethod
    def from_header(cls, header: Mapping[str, object]) -> TarShards:
        """The store an index header describes; `ValueError` naming what is missing."""
        root = header_root(header, STORE_KIND)
        url, cache = header.get("url"), header.get("cache_bytes", 0)
        if not (url is None or isinstance(url, str)) or type(cache) is not int:
            raise ValueError(f"a {STORE_KIND!r} store's url {url!r} or cache {cache!r} is wrong")
        return cls(root, url, cache)


_CACHES: dict[tuple[int, Path, int], remote_reads.ReadThroughCache] = {}


def _cache(root: Path, max_bytes: int) -> remote_reads.ReadThroughCache:
    """The read-through cache under `root`, one per process (each counts what it wrote)."""
    key = (os.getpid(), root, max_bytes)
    with _OPEN_SHARDS_LOCK:
        found = _CACHES.get(key)
        if found is None:
            found = _CACHES[key] = remote_reads.ReadThroughCache(root / "read-cache", max_bytes)
        return found


_OPEN_SHARDS: OrderedDict[tuple[int, Path, int, int], int] = OrderedDict()
_MAX_OPEN_SHARDS = 64
_OPEN_SHARDS_LOCK = threading.Lock()


def _pread_member(path: Path, size: int, offset: int) -> bytes:
    """`size` bytes at `offset` of `path`, through a descriptor kept open for the next read
    (the 64 most recently used): a member read is then a `stat` and a `pread`, as cheap as
    reading a loose file. Keyed by process (a forked loader worker opens its own) and by the
    file's inode and modification time (a shard replaced since is opened afresh); the lock
    keeps a thread from closing a descriptor another is reading."""
    stat = os.stat(path)
    key = (os.getpid(), path, stat.st_ino, stat.st_mtime_ns)
    with _OPEN_SHARDS_LOCK:
        fd = _OPEN_SHARDS.get(key)
        if fd is None:
            fd = _OPEN_SHARDS[key] = os.open(path, os.O_RDONLY)
            if len(_OPEN_SHARDS) > _MAX_OPEN_SHARDS:
                old_key, old = _OPEN_SHARDS.popitem(last=False)
                if old_key[0] == key[0]:  # another process's descriptor is not ours to close
                    os.close(old)
        _OPEN_SHARDS.move_to_end(key)
        return os.pread(fd, size, offset)


def shard_paths(config: SourceConfig) -> list[Path]:
    """The shards `config.path` names: itself when it is a `.tar` file, else every `.tar`
    under it, in name order (the index order, which a resumed run relies on)."""
    require_exists(config)
    path = config.path.absolute()
    if path.is_file():
        return [path]
    shards = sorted(p for p in path.rglob(f"*{SHARD_SUFFIX}") if p.is_file())
    if not shards:
        compressed = sorted(path.rglob("*.tar.gz")) + sorted(path.rglob("*.tgz"))
        hint = (
            "shards must be uncompressed tar files: a compressed one has no byte offsets to "
            "read a sample from (img2dataset writes uncompressed .tar)"
            if compressed
            else "write the shards as NAME.tar files, or pick another data.source.format"
        )
        raise SourceError(f"tar dataset {path} holds no {SHARD_SUFFIX} shard", hint=hint)
    return shards


@attrs.frozen
class TarShardSource:
    """One sample per key that has an image and a conditioning member."""

    config: SourceConfig

    @property
    def store(self) -> TarShards:
        config = self.config
        cache_bytes = int(config.read_cache_gib * 2**30)
        return TarShards(config.root, config.url, cache_bytes if config.url else 0)

    @property
    def counts_lines(self) -> bool:
        return False

    def records(self, count: LineCount) -> Iterator[SourceRecord]:
        root, url = self.config.root, self.config.url
        if url is not None:
            for shard in remote_shards(url):
                yield from self._shard_records(shard, _RemoteShard(url, shard))
            return
        for path in shard_paths(self.config):
            yield from self._shard_records(path.relative_to(root).as_posix(), path)

    def _shard_records(self, shard: str, opened: Path | _RemoteShard) -> Iterator[SourceRecord]:
        if ":" in shard or not is_utf8(shard):
            reason = "shard path has a ':' or is not valid UTF-8; rename it"
            yield SourceRecord(shard, "", "", problem=("bad_file_name", reason))
            return
        read = _read_shard(opened, shard)
        for key, members in read.groups.items():
            if key in read.repeated:
                reason = f"a member name under key {key!r} appears twice in the shard"
                where = f"{shard}:{key}"
                yield SourceRecord(where, where, "", problem=("ambiguous_pair", reason))
                continue
            record = self._record(shard, key, members)
            size = read.sizes.get(key)
            yield record if size is None or record.problem else attrs.evolve(record, size=size)
        if read.problem is not None:
            yield SourceRecord(shard, shard, "", problem=("bad_shard", read.problem))

    def _record(self, shard: str, key: str, members: dict[str, Member]) -> SourceRecord:
        where = f"{shard}:{key}"
        wanted_cond = self.config.conditioning_extension.lstrip(".").lower()
        caption_ext = self.config.caption_suffix.lstrip(".").lower()
        images = [m for ext, m in members.items() if _is_image(ext) and ext != wanted_cond]
        cond = members.get(wanted_cond)
        shown_cond = f"{key}.{wanted_cond}"
        if not images:
            problem = ("missing_file", "no image member")
            return SourceRecord(where, where, shown_cond, problem=problem)
        image = TarShards.reference(images[0])
        if len(images) > 1:
            names = ", ".join(m.name for m in images)
            reason = f"several image members share the key {key!r}: {names}"
            return SourceRecord(where, image, shown_cond, problem=("ambiguous_pair", reason))
        if cond is None:
            reason = f"no conditioning member {shown_cond}"
            return SourceRecord(where, image, shown_cond, problem=("missing_file", reason))
        caption = members.get(caption_ext)
        if caption is None:
            reason = f"no caption member {key}.{caption_ext}"
            return SourceRecord(
                where, image, TarShards.reference(cond), problem=("caption_missing", reason)
            )
        return SourceRecord(
            where,
            image,
            TarShards.reference(cond),
            caption_member=TarShards.reference(caption),
        )


def split_name(name: str) -> tuple[str, str]:
    """A member name's (key, extension), split at the first dot of its file name, as
    webdataset does: `a/000123.cond.png` -> (`a/000123`, `cond.png`)."""
    folder, _, file_name = name.rpartition("/")
    stem, _, extension = file_name.partition(".")
    return (f"{folder}/{stem}" if folder else stem), extension.lower()


def _is_image(extension: str) -> bool:
    return f".{extension.rsplit('.', 1)[-1]}" in IMAGE_SUFFIXES


@attrs.define
class _ShardRead:
    groups: dict[str, dict[str, Member]] = attrs.Factory(dict)
    """The regular members by key and extension, keys in the order they appear."""
    sizes: dict[str, tuple[int, int]] = attrs.Factory(dict)
    """(height, width) by key, from `KEY.json` where it has `width` and `height`."""
    problem: str | None = None
    """Why reading stopped early (a damaged or compressed shard), if it did."""
    repeated: set[str] = attrs.Factory(set)
    """Keys with a member name that appears twice: which one is the sample is unknown."""


@attrs.frozen
class _RemoteShard:
    url: str
    shard: str

    def open(self) -> tuple[IO[bytes], int]:
        return remote_reads.open_remote(remote_reads.join(self.url, self.shard))


def remote_shards(url: str) -> list[str]:
    """The shards at `url`, relative to it (`""` when `url` is one shard), in name order."""
    shards = remote_reads.list_files(url, SHARD_SUFFIX)
    if not shards:
        raise SourceError(
            f"tar dataset {url} holds no {SHARD_SUFFIX} shard",
            hint="check data.source.url names the folder (prefix) of the shards",
        )
    return shards


def _open_shard(where: Path | _RemoteShard) -> tuple[IO[bytes], int]:
    if isinstance(where, _RemoteShard):
        return where.open()
    return open(where, "rb"), where.stat().st_size


def _read_shard(where: Path | _RemoteShard, shard: str) -> _ShardRead:
    read = _ShardRead()
    try:
        fh, size = _open_shard(where)
        with fh, tarfile.open(fileobj=fh, mode="r:") as tar:
            for info in tar:
                if not info.isreg():
                    continue
                if info.offset_data + info.size > size:  # tarfile reads headers, not data
                    read.problem = f"member {info.name} is cut off at byte {size} of the shard"
                    return read
                key, extension = split_name(info.name)
                member = Member(shard, info.offset_data, info.size, info.name)
                group = read.groups.setdefault(key, {})
                if extension in group:
                    read.repeated.add(key)
                group.setdefault(extension, member)
                if extension == "json" and info.size <= _MAX_JSON_BYTES:
                    _note_size(read.sizes, key, tar.extractfile(info))
    except (tarfile.TarError, OSError) as exc:
        read.problem = f"shard cannot be read past its first {len(read.groups)} keys: {exc}"
    return read


_MAX_JSON_BYTES = 1 << 16


def _note_size(sizes: dict[str, tuple[int, int]], key: str, fh: IO[bytes] | None) -> None:
    """Record `KEY.json`'s width and height (as img2dataset writes them); a JSON member
    without them, or not JSON, just leaves the sizes to the image headers."""
    try:
        meta = json.loads(fh.read()) if fh is not None else None
    except ValueError:
        return
    if not isinstance(meta, dict):
        return
    width, height = meta.get("width"), meta.get("height")
    if type(width) is int and type(height) is int and width > 0 and height > 0:
        sizes[key] = (height, width)
