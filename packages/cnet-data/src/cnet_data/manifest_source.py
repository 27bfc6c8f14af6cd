"""Manifest sources: a JSONL manifest (`jsonl`) and the ControlNet tutorial's `prompt.json`.

Both are a list of JSON objects naming an image, a conditioning image and a caption; they
differ in the keys (configurable for `jsonl`; `target`, `source`, `prompt` for `prompt_json`).
Paths are relative to the manifest's folder and may not leave it.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import attrs

from cnet_data.jsonlines import LineCount, json_type, read_records, shorten
from cnet_data.local_files import LocalFiles
from cnet_data.source_protocol import SourceRecord
from cnet_data.sources import SourceConfig, SourceError, inside_root, is_utf8, require_exists

PROMPT_JSON_KEYS = ("target", "source", "prompt")
"""The image, conditioning image and caption keys of the tutorial's `prompt.json`."""


@attrs.frozen
class ManifestSource:
    """One sample per manifest entry; `keys` name the image, conditioning and caption."""

    config: SourceConfig
    keys: tuple[str, str, str]
    """The JSON keys of the image path, the conditioning image path and the caption."""

    @classmethod
    def jsonl(cls, config: SourceConfig) -> ManifestSource:
        keys = (config.image_key, config.conditioning_key, config.caption_key)
        return cls(config, keys)

    @classmethod
    def prompt_json(cls, config: SourceConfig) -> ManifestSource:
        return cls(config, PROMPT_JSON_KEYS)

    @property
    def store(self) -> LocalFiles:
        return LocalFiles(self.config.root)

    @property
    def counts_lines(self) -> bool:
        return True

    def records(self, count: LineCount) -> Iterator[SourceRecord]:
        path, root = self.config.path, self.config.root
        require_exists(self.config)
        if path.is_dir():
            raise SourceError(
                f"dataset manifest {path} is a folder",
                hint="a folder of pairs is read with --format folder (format: folder)",
            )
        for record in read_records(path, count):
            if record.problem is not None:
                yield SourceRecord(record.where, "", "", problem=("manifest_error", record.problem))
                continue
            assert isinstance(record.value, dict)
            missing = [k for k in self.keys if k not in record.value]
            if missing:
                reason = f"missing key(s) {', '.join(map(repr, missing))}"
                yield SourceRecord(record.where, "", "", problem=("manifest_error", reason))
                continue
            image, conditioning, caption = (record.value[k] for k in self.keys)
            yield _checked_record(record.where, root, image, conditioning, caption)


def _checked_record(
    where: str, root: Path, image: object, conditioning: object, caption: object
) -> SourceRecord:
    for label, value in (("image", image), ("conditioning image", conditioning)):
        reason = _path_problem(label, value)
        if reason is not None:
            shown_image, shown_cond = (shorten(str(v)) for v in (image, conditioning))
            return SourceRecord(where, shown_image, shown_cond, problem=("manifest_error", reason))
    assert isinstance(image, str) and isinstance(conditioning, str)
    if isinstance(caption, str) and not is_utf8(caption):
        reason = "caption holds an unpaired surrogate (not Unicode text)"
        return SourceRecord(where, image, conditioning, problem=("caption_not_text", reason))
    image_rel, cond_rel = inside_root(root, image), inside_root(root, conditioning)
    if image_rel is None or cond_rel is None:
        bad = image if image_rel is None else conditioning
        return SourceRecord(
            where,
            image,
            conditioning,
            problem=("path_outside_root", f"path {bad!r} leaves the dataset root {root}"),
        )
    return SourceRecord(where, image_rel, cond_rel, caption=caption)


def _path_problem(label: str, value: object) -> str | None:
    """Why `value` cannot be a path, or None."""
    if not isinstance(value, str):
        return f"{label} path is a JSON {json_type(value)}, not a string: {shorten(repr(value))}"
    if not value.strip():
        return f"{label} path is empty"
    if "\x00" in value:
        return f"{label} path holds a NUL character"
    if not is_utf8(value):
        return f"{label} path holds an unpaired surrogate (not Unicode text)"
    return None
