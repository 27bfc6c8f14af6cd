"""Dataset sources: what the user points at, read into (image, conditioning, caption) references.

Three layouts are understood:
- a JSONL manifest with configurable keys (paths relative to the manifest's folder);
- a folder of pairs: `images/` and `conditioning/` with matching relative stems and caption
  sidecars next to the images (`images/a/001.jpg`, `conditioning/a/001.png`, `images/a/001.txt`);
- the original ControlNet tutorial's `prompt.json` (`source` = conditioning, `target` = image,
  `prompt` = caption; one JSON object per line, or one JSON array).

Sources only read text; image files are probed later, in parallel. Paths are normalised
lexically and a path that leaves the dataset root is reported, never followed. Every entry that
cannot be used (a manifest line that is not UTF-8, not JSON, too deep, not an object, lacks a
key or has one of the wrong type; a file name that is not UTF-8) comes out as a `RawSample`
with a `problem`, so it is reported with its line like any other bad sample.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import attrs

from cnet_data.errors import CnetError
from cnet_data.jsonlines import LineCount, json_type, read_records, shorten

SourceFormat = Literal["jsonl", "folder", "prompt_json"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif")


class SourceError(CnetError, FileNotFoundError):
    """The dataset source is not there, or not laid out as its format needs.

    A `FileNotFoundError` too, as it was before cnet's error classes existed."""

    exit_code = 2

    def __init__(self, message: str, *, hint: str = "") -> None:
        super().__init__(message, hint=hint)


@attrs.frozen
class RawSample:
    """One entry of a source, before its files are looked at."""

    where: str
    """Where the entry comes from, for reports: `manifest.jsonl:12` or a relative image path."""
    image: str
    """Image path relative to the dataset root (POSIX separators), or the raw value if bad."""
    conditioning: str
    """Conditioning image path relative to the dataset root, or the raw value if bad."""
    caption: object = None
    """The caption as the source holds it; anything but `str` is a bad sample."""
    caption_file: str | None = None
    """A sidecar to read the caption from (folder layout); overrides `caption`."""
    problem: tuple[str, str] | None = None
    """(kind, reason) when the entry itself is already known to be bad."""


@attrs.frozen
class SourceConfig:
    """Where the samples are and how their fields are named."""

    path: Path
    """A JSONL manifest, a `prompt.json`, or a folder of pairs."""
    format: SourceFormat | None = None
    """Layout of `path`; detected from it when not given."""
    image_key: str = "image"
    """JSONL key of the image path."""
    conditioning_key: str = "conditioning_image"
    """JSONL key of the conditioning image path."""
    caption_key: str = "text"
    """JSONL key of the caption."""
    image_dir: str = "images"
    """Folder layout: sub-folder holding the images (and their caption sidecars)."""
    conditioning_dir: str = "conditioning"
    """Folder layout: sub-folder holding the conditioning images."""
    caption_suffix: str = ".txt"
    """Folder layout: suffix of the caption sidecar that sits next to each image."""

    @property
    def resolved_format(self) -> SourceFormat:
        if self.format is not None:
            return self.format
        if self.path.is_dir():
            return "folder"
        if self.path.name == "prompt.json":
            return "prompt_json"
        return "jsonl"

    @property
    def root(self) -> Path:
        """The dataset root: the folder itself, or the folder holding the manifest."""
        path = self.path.absolute()
        return path if self.resolved_format == "folder" else path.parent


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


def read_source(config: SourceConfig, count: LineCount | None = None) -> Iterator[RawSample]:
    """Every entry of the source, in a stable order; `count` tallies a manifest's lines."""
    fmt = config.resolved_format
    if not config.path.exists():
        raise SourceError(
            f"dataset source {config.path} does not exist",
            hint="give the path of a JSONL manifest, a prompt.json or a folder of pairs",
        )
    if fmt == "folder":
        yield from _read_folder(config)
    elif fmt == "prompt_json":
        keys = ("target", "source", "prompt")
        yield from _read_records(config.path, config.root, keys, count)
    else:
        keys = (config.image_key, config.conditioning_key, config.caption_key)
        yield from _read_records(config.path, config.root, keys, count)


def _read_records(
    path: Path, root: Path, keys: tuple[str, str, str], count: LineCount | None
) -> Iterator[RawSample]:
    """One sample per manifest entry; `keys` name the image, conditioning and caption."""
    if path.is_dir():
        raise SourceError(
            f"dataset manifest {path} is a folder",
            hint="a folder of pairs is read with --format folder (format: folder)",
        )
    for record in read_records(path, count):
        if record.problem is not None:
            yield RawSample(record.where, "", "", problem=("manifest_error", record.problem))
            continue
        assert isinstance(record.value, dict)
        missing = [k for k in keys if k not in record.value]
        if missing:
            reason = f"missing key(s) {', '.join(map(repr, missing))}"
            yield RawSample(record.where, "", "", problem=("manifest_error", reason))
            continue
        image, conditioning, caption = (record.value[k] for k in keys)
        yield _checked_sample(record.where, root, image, conditioning, caption)


def _checked_sample(
    where: str, root: Path, image: object, conditioning: object, caption: object
) -> RawSample:
    for label, value in (("image", image), ("conditioning image", conditioning)):
        reason = _path_problem(label, value)
        if reason is not None:
            shown_image, shown_cond = (shorten(str(v)) for v in (image, conditioning))
            return RawSample(where, shown_image, shown_cond, problem=("manifest_error", reason))
    assert isinstance(image, str) and isinstance(conditioning, str)
    if isinstance(caption, str) and not _is_utf8(caption):
        reason = "caption holds an unpaired surrogate (not Unicode text)"
        return RawSample(where, image, conditioning, problem=("caption_not_text", reason))
    image_rel, cond_rel = inside_root(root, image), inside_root(root, conditioning)
    if image_rel is None or cond_rel is None:
        bad = image if image_rel is None else conditioning
        return RawSample(
            where,
            image,
            conditioning,
            problem=("path_outside_root", f"path {bad!r} leaves the dataset root {root}"),
        )
    return RawSample(where, image_rel, cond_rel, caption=caption)


def _path_problem(label: str, value: object) -> str | None:
    """Why `value` cannot be a path, or None."""
    if not isinstance(value, str):
        return f"{label} path is a JSON {json_type(value)}, not a string: {shorten(repr(value))}"
    if not value.strip():
        return f"{label} path is empty"
    if "\x00" in value:
        return f"{label} path holds a NUL character"
    if not _is_utf8(value):
        return f"{label} path holds an unpaired surrogate (not Unicode text)"
    return None


def _is_utf8(text: str) -> bool:
    """Whether `text` can be stored in the index (which keeps UTF-8)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _read_folder(config: SourceConfig) -> Iterator[RawSample]:
    root = config.root
    image_root = root / config.image_dir
    cond_root = root / config.conditioning_dir
    for folder in (image_root, cond_root):
        if not folder.is_dir():
            raise SourceError(
                f"folder dataset {root} has no {folder.name}/ sub-folder (expected "
                f"{config.image_dir}/ and {config.conditioning_dir}/)",
                hint="a manifest is read with --format jsonl; a folder needs both sub-folders",
            )
    conditioning_by_stem = _images_by_stem(cond_root)
    for stem, images in sorted(_images_by_stem(image_root).items()):
        image_rel = images[0].relative_to(root).as_posix()
        if not _is_utf8(image_rel):
            reason = "file name is not valid UTF-8; rename it"
            yield RawSample(shorten(repr(image_rel)), "", "", problem=("bad_file_name", reason))
            continue
        conds = conditioning_by_stem.get(stem, [])
        caption_rel = (image_root / (stem + config.caption_suffix)).relative_to(root).as_posix()
        problem = _pairing_problem(root, stem, images, conds)
        if problem is not None:
            yield RawSample(
                image_rel, image_rel, f"{config.conditioning_dir}/{stem}.*", problem=problem
            )
            continue
        cond_rel = conds[0].relative_to(root).as_posix()
        yield RawSample(image_rel, image_rel, cond_rel, caption_file=caption_rel)


def _pairing_problem(
    root: Path, stem: str, images: list[Path], conds: list[Path]
) -> tuple[str, str] | None:
    if not conds:
        return ("missing_file", "no conditioning image with the same name")
    for kind, found in (("image", images), ("conditioning image", conds)):
        if len(found) > 1:
            names = ", ".join(p.relative_to(root).as_posix() for p in found)
            return ("ambiguous_pair", f"several {kind}s share the name {stem!r}: {names}")
    return None


def _images_by_stem(folder: Path) -> dict[str, list[Path]]:
    """Image files under `folder` grouped by their relative path without suffix."""
    found: dict[str, list[Path]] = {}
    for dirpath, _dirs, files in os.walk(folder):
        for name in sorted(files):
            path = Path(dirpath) / name
            if path.suffix.lower() in IMAGE_SUFFIXES:
                found.setdefault(path.relative_to(folder).with_suffix("").as_posix(), []).append(
                    path
                )
    return found
