"""The `folder` source: `images/` and `conditioning/` paired by relative stem, captions in
sidecars next to the images (`images/a/001.jpg`, `conditioning/a/001.png`, `images/a/001.txt`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import attrs

from cnet_data.jsonlines import LineCount, shorten
from cnet_data.local_files import LocalFiles
from cnet_data.source_protocol import SourceRecord
from cnet_data.sources import IMAGE_SUFFIXES, SourceConfig, SourceError, is_utf8, require_exists


@attrs.frozen
class FolderSource:
    """One sample per image that has a conditioning image of the same relative stem."""

    config: SourceConfig

    @property
    def store(self) -> LocalFiles:
        return LocalFiles(self.config.root)

    @property
    def counts_lines(self) -> bool:
        return False

    def records(self, count: LineCount) -> Iterator[SourceRecord]:
        config = self.config
        require_exists(config)
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
            yield self._record(stem, images, conditioning_by_stem.get(stem, []))

    def _record(self, stem: str, images: list[Path], conds: list[Path]) -> SourceRecord:
        root, config = self.config.root, self.config
        image_rel = images[0].relative_to(root).as_posix()
        if not is_utf8(image_rel):
            reason = "file name is not valid UTF-8; rename it"
            return SourceRecord(shorten(repr(image_rel)), "", "", problem=("bad_file_name", reason))
        caption_rel = (root / config.image_dir / (stem + config.caption_suffix)).relative_to(root)
        problem = _pairing_problem(root, stem, images, conds)
        if problem is not None:
            shown = f"{config.conditioning_dir}/{stem}.*"
            return SourceRecord(image_rel, image_rel, shown, problem=problem)
        cond_rel = conds[0].relative_to(root).as_posix()
        return SourceRecord(image_rel, image_rel, cond_rel, caption_member=caption_rel.as_posix())


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
                stem = path.relative_to(folder).with_suffix("").as_posix()
                found.setdefault(stem, []).append(path)
    return found
