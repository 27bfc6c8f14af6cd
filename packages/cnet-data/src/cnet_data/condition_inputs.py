"""Where `cnet-data condition` takes its images from: a folder, a manifest or a dataset.

Each input image becomes a `SourceImage`: the name its pair gets in the output (`stem`, a
relative path without suffix), where its bytes are (a reference of a `SampleStore`, so that
worker processes open it as the dataset would), and its caption (a sidecar file to carry over,
or the text itself).

- a folder: every image under it, its caption the `x.txt` sidecar of `x.jpg` if there is one;
- a JSONL manifest (or `prompt.json`): `image_key` and `caption_key` of each line (no
  conditioning key is needed: that is what is being made), paths relative to its folder;
- a Hugging Face dataset (`format: hf`): its image and caption columns, each row named
  `FILE_STEM/ROW`.
"""

from __future__ import annotations

import os
from pathlib import Path

import attrs

from cnet_data.hf_rows import HfRows, HfRowSource
from cnet_data.jsonlines import LineCount, read_records
from cnet_data.local_files import LocalFiles
from cnet_data.source_protocol import SampleStore
from cnet_data.sources import IMAGE_SUFFIXES, SourceConfig, inside_root


@attrs.frozen
class SourceImage:
    """One image to make the conditioning of."""

    stem: str
    """The pair's name in the output, relative, without suffix (`a/001`)."""
    reference: str
    """The image, as the input's store names it."""
    caption: str | None = None
    """The caption's text, written as the output's sidecar."""
    caption_file: str | None = None
    """A sidecar of the input (a reference of the same store), carried over instead."""


@attrs.frozen
class ConditionInput:
    """The images of one input, and what could not be used of it."""

    store: SampleStore
    images: list[SourceImage]
    problems: list[tuple[str, str]]
    """(where, reason) for each entry that names no usable image."""
    walked: bool = False
    """Whether the images were found by walking the store's root (an output inside it would
    be taken for input by the next run)."""


def read_input(config: SourceConfig) -> ConditionInput:
    """The images `config` names; a folder is taken as images alone (no `images/` needed)."""
    path = config.path.absolute()
    if path.is_dir() and config.format in (None, "folder") and config.resolved_format != "hf":
        return _folder_input(path)
    kind = config.resolved_format
    if kind == "hf":
        return _dataset_input(config)
    if kind in ("jsonl", "prompt_json"):
        return _manifest_input(config)
    raise ValueError(f"cnet-data condition does not read {kind!r} sources")


def _folder_input(folder: Path) -> ConditionInput:
    images = []
    for rel in find_images(folder):
        sidecar = Path(rel).with_suffix(".txt").as_posix()
        caption_file = sidecar if (folder / sidecar).is_file() else None
        stem = Path(rel).with_suffix("").as_posix()
        images.append(SourceImage(stem, rel, caption_file=caption_file))
    return ConditionInput(LocalFiles(folder), images, [], walked=True)


def find_images(folder: Path) -> list[str]:
    """Every image under `folder`, as sorted POSIX paths relative to it."""
    found = []
    for dirpath, _dirs, files in os.walk(folder):
        for name in files:
            path = Path(dirpath) / name
            if path.suffix.lower() in IMAGE_SUFFIXES:
                found.append(path.relative_to(folder).as_posix())
    return sorted(found)


def _manifest_input(config: SourceConfig) -> ConditionInput:
    root = config.root
    is_prompt_json = config.resolved_format == "prompt_json"
    image_key = "target" if is_prompt_json else config.image_key
    caption_key = "prompt" if is_prompt_json else config.caption_key
    images, problems = [], []
    for record in read_records(config.path, LineCount()):
        value = record.value
        if record.problem is not None or not isinstance(value, dict):
            problems.append((record.where, record.problem or "not a JSON object"))
            continue
        image, caption = value.get(image_key), value.get(caption_key, "")
        rel = inside_root(root, image) if isinstance(image, str) else None
        if rel is None or not isinstance(caption, str):
            what = f"key {image_key!r} is not a path inside {root}" if rel is None else ""
            problems.append((record.where, what or f"key {caption_key!r} is not text"))
            continue
        stem = Path(rel).with_suffix("").as_posix()
        images.append(SourceImage(stem, rel, caption=caption))
    return ConditionInput(LocalFiles(root), images, problems)


def _dataset_input(config: SourceConfig) -> ConditionInput:
    # The conditioning column is not there yet: the image column stands in for it.
    source = HfRowSource(attrs.evolve(config, conditioning_key=config.image_key))
    images, problems = [], []
    for record in source.records(LineCount()):
        if record.problem is not None or not isinstance(record.caption, str):
            reason = record.problem[1] if record.problem else "caption is not text"
            problems.append((record.where, reason))
            continue
        file, row, _ = HfRows.cell(record.image)
        stem = f"{Path(file).with_suffix('').as_posix()}/{row:08d}"
        images.append(SourceImage(stem, record.image, caption=record.caption))
    return ConditionInput(source.store, images, problems)
