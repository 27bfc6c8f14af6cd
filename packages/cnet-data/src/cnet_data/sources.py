"""Dataset sources: the user's `data.source` settings, and the rules every local source shares.

Four layouts are understood, each a `SampleSource` (`cnet_data.source_protocol`) registered by
its `format` name in `cnet_data.source_registry`:
- `jsonl`: a JSONL manifest with configurable keys (paths relative to the manifest's folder),
  `cnet_data.manifest_source`;
- `folder`: a folder of pairs, `images/` and `conditioning/` with matching relative stems and
  caption sidecars next to the images (`images/a/001.jpg`, `conditioning/a/001.png`,
  `images/a/001.txt`), `cnet_data.folder_source`;
- `prompt_json`: the original ControlNet tutorial's `prompt.json` (`source` = conditioning,
  `target` = image, `prompt` = caption; one JSON object per line, or one JSON array);
- `tar`: WebDataset-style tar shards (`000123.jpg`, `000123.cond.png`, `000123.txt`), one `.tar`
  file or a folder of them (or an fsspec `url` of them), read by byte range,
  `cnet_data.tar_shards`;
- `hf`: a Hugging Face dataset's parquet or arrow files (the fill50k layout), `cnet_data.hf_rows`.

Sources only read text; image files are probed later, in parallel. Paths are normalised
lexically and a path that leaves the dataset root is reported, never followed. Every entry that
cannot be used (a manifest line that is not UTF-8, not JSON, too deep, not an object, lacks a
key or has one of the wrong type; a file name that is not UTF-8) comes out as a `SourceRecord`
with a `problem`, so it is reported with its line like any other bad sample.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import attrs

from cnet_data.errors import CnetError

SourceFormat = Literal["jsonl", "folder", "prompt_json", "tar", "hf"]
"""The source kinds `format` may name: those of `cnet_data.source_registry.SOURCE_KINDS` (a test
keeps the two equal; a new kind is registered there and named here)."""

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif")


class SourceError(CnetError, FileNotFoundError):
    """The dataset source is not there, or not laid out as its format needs.

    A `FileNotFoundError` too, as it was before cnet's error classes existed."""

    exit_code = 2

    def __init__(self, message: str, *, hint: str = "") -> None:
        super().__init__(message, hint=hint)


@attrs.frozen
class SourceConfig:
    """Where the samples are and how their fields are named."""

    path: Path
    """A JSONL manifest, a `prompt.json`, a folder of pairs, a `.tar` shard or folder of
    shards, or a Hugging Face dataset's parquet or arrow file or folder; with `url`, the
    local folder kept for the dataset."""
    format: SourceFormat | None = None
    """Layout of `path`; detected from it when not given."""
    image_key: str = "image"
    """JSONL key of the image path; `hf` layout: the image column."""
    conditioning_key: str = "conditioning_image"
    """JSONL key of the conditioning image path; `hf` layout: its column."""
    caption_key: str = "text"
    """JSONL key of the caption; `hf` layout: the caption column."""
    image_dir: str = "images"
    """Folder layout: sub-folder holding the images (and their caption sidecars)."""
    conditioning_dir: str = "conditioning"
    """Folder layout: sub-folder holding the conditioning images."""
    caption_suffix: str = ".txt"
    """Folder layout: suffix of the caption sidecar that sits next to each image; tar layout:
    the caption member's extension (`KEY.txt`)."""
    conditioning_extension: str = "cond.png"
    """Tar layout: the extension of each sample's conditioning member (`KEY.cond.png`); the
    image is the sample's one other image member."""
    split: str = "train"
    """Hf layout: the split read from a folder holding several (files under a `SPLIT/` folder
    or named `SPLIT-...`); a folder with no split marked is read whole."""
    url: str | None = None
    """Where the data is when it is not on this machine: an fsspec URL of tar shards
    (`s3://bucket/shards`, `gs://...`, `https://...`; needs `cnet-data[remote]` and the
    filesystem's package) or a hub dataset `hf://datasets/OWNER/NAME` (downloaded to `path`).
    `path` is then the local folder cnet keeps for the dataset (the read-through cache)."""
    read_cache_gib: float = 0.0
    """Tar shards at a `url`: the bound of the local read-through cache of members under `path`
    (0 reads every member from the URL)."""

    @property
    def resolved_format(self) -> SourceFormat:
        if self.format is not None:
            return self.format
        if self.url is not None:
            return "hf" if self.url.startswith("hf://datasets/") else "tar"
        if self.path.is_dir():
            return self._folder_format()
        if self.path.name == "prompt.json":
            return "prompt_json"
        by_suffix: dict[str, SourceFormat] = {".tar": "tar", ".parquet": "hf", ".arrow": "hf"}
        return by_suffix.get(self.path.suffix, "jsonl")

    def _folder_format(self) -> SourceFormat:
        # A folder of pairs has its image folder; otherwise shards, or a dataset's row
        # files, in it make it tar or hf.
        if (self.path / self.image_dir).is_dir():
            return "folder"
        if next(self.path.rglob("*.tar"), None) is not None:
            return "tar"
        marks = ("dataset_info.json", "dataset_dict.json", "state.json")
        if any((self.path / mark).is_file() for mark in marks):
            return "hf"
        rows = next(self.path.rglob("*.parquet"), None) or next(self.path.rglob("*.arrow"), None)
        return "hf" if rows is not None else "folder"

    @property
    def root(self) -> Path:
        """The dataset root: the folder itself, or the folder holding the manifest (or the
        one file of shards or rows)."""
        path = self.path.absolute()
        kind = self.resolved_format
        is_folder = kind == "folder" or (kind in ("tar", "hf") and not path.is_file())
        return path if is_folder else path.parent


def inside_root(root: Path, relative: str) -> str | None:
    """`relative` normalised to a POSIX path under `root`, or None if it leaves the root.

    Normalisation is lexical (symlinks are not resolved) so that a dataset whose folders are
    symlinks into shared storage still works, while `..` and absolute paths cannot escape.
    """
    if not relative or "\x00" in relative:
        return None
    joined = os.path.normpath(os.path.join(root, relative))
    base = os.path.normpath(root)
    if os.path.commonpath([base, joined]) != base or joined == base:
        return None
    return Path(os.path.relpath(joined, base)).as_posix()


def require_exists(config: SourceConfig) -> None:
    """`SourceError` unless the local path the source names is there."""
    if not config.path.exists():
        raise SourceError(
            f"dataset source {config.path} does not exist",
            hint="give the path of a JSONL manifest, a prompt.json, a folder of pairs or of tar "
            "shards",
        )


def is_utf8(text: str) -> bool:
    """Whether `text` can be stored in the index (which keeps UTF-8)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
