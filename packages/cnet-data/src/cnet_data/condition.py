"""`cnet-data condition`: make the conditioning images of a folder of images.

The output is a dataset cnet indexes as it is (the `folder` layout): `OUT/images/REL` (a hard
link to the input image where the filesystem allows, else a copy), its caption sidecar
`OUT/images/REL_STEM.txt` when the input has one, and `OUT/conditioning/REL_STEM.png`.

Canny edges are computed as the ControlNet annotator and the diffusers examples compute them:
`cv2.Canny` on the RGB image with the two hysteresis thresholds, the one-channel edge map
repeated to three channels. OpenCV comes with the `cnet-data[condition]` extra.

Every output is written to a temporary file and renamed, and a pair whose conditioning image
is already there is skipped, so an interrupted run is finished by running it again.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import attrs
import numpy as np
from PIL import Image, ImageOps
from tqdm import tqdm

from cnet_data.atomic import atomic_open
from cnet_data.errors import CnetError
from cnet_data.sources import IMAGE_SUFFIXES

_CHUNK = 16


class ConditionError(CnetError, ValueError):
    """The conditioning cannot be made as asked (missing library, bad thresholds, no images)."""

    exit_code = 2


@attrs.frozen
class CannyConfig:
    """OpenCV Canny's hysteresis thresholds (the ControlNet annotator's defaults)."""

    low: int = 100
    """Gradients below this are never edges."""
    high: int = 200
    """Gradients above this are always edges; between the two, only where joined to one."""

    def check(self) -> None:
        if not 0 <= self.low <= self.high:
            raise ConditionError(
                f"canny thresholds must satisfy 0 <= low <= high, got low {self.low}, "
                f"high {self.high}",
                hint="e.g. --low 100 --high 200",
            )


@attrs.define
class ConditionReport:
    """What a run did."""

    written: int = 0
    skipped: int = 0
    """Pairs already complete from an earlier run."""
    failed: list[tuple[str, str]] = attrs.Factory(list)
    """(image, reason) for each image that could not be read."""


def canny_map(rgb: np.ndarray[Any, np.dtype[np.uint8]], config: CannyConfig) -> Image.Image:
    """The three-channel Canny edge map of an RGB uint8 image."""
    cv2 = _opencv()
    edges = cv2.Canny(rgb, config.low, config.high)
    return Image.fromarray(np.repeat(edges[:, :, None], 3, axis=2))


def _opencv() -> Any:
    try:
        import cv2
    except ImportError:
        raise ConditionError(
            "Canny conditioning needs OpenCV, which is not installed",
            hint="pip install 'cnet-data[condition]' (opencv-python-headless)",
        ) from None
    return cv2


def find_images(folder: Path) -> list[str]:
    """Every image under `folder`, as sorted POSIX paths relative to it."""
    found = []
    for dirpath, _dirs, files in os.walk(folder):
        for name in files:
            path = Path(dirpath) / name
            if path.suffix.lower() in IMAGE_SUFFIXES:
                found.append(path.relative_to(folder).as_posix())
    return sorted(found)


def condition_folder(
    source: Path,
    out: Path,
    config: CannyConfig = CannyConfig(),
    *,
    workers: int = 0,
    progress: bool = True,
) -> ConditionReport:
    """Write the folder-layout dataset of `source`'s images and their Canny maps to `out`."""
    config.check()
    _opencv()  # refuse before any work when OpenCV is missing
    source, out = Path(source).absolute(), Path(out).absolute()
    images = find_images(source)
    if not images:
        raise ConditionError(f"no images under {source}", hint="give a folder of images")
    if out == source or source in out.parents:
        raise ConditionError(f"--out {out} is inside the source folder {source}; pick another")
    report = ConditionReport()
    images, report.failed = _unique_stems(images)
    todo = [rel for rel in images if not _conditioning_path(out, rel).is_file()]
    report.skipped = len(images) - len(todo)
    bar = tqdm(total=len(todo), desc="conditioning", unit="image", disable=not progress)
    for rel, problem in _run_all(source, out, todo, config, workers):
        bar.update()
        if problem is None:
            report.written += 1
        else:
            report.failed.append((rel, problem))
    bar.close()
    return report


def _unique_stems(images: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """The images whose name without suffix is theirs alone (`a.jpg` and `a.png` would share
    `conditioning/a.png`), and a reason for each of the others."""
    by_stem: dict[str, list[str]] = {}
    for rel in images:
        by_stem.setdefault(Path(rel).with_suffix("").as_posix(), []).append(rel)
    unique = [names[0] for names in by_stem.values() if len(names) == 1]
    clashing = [
        (rel, f"shares its name with {', '.join(n for n in names if n != rel)}; rename one")
        for names in by_stem.values()
        if len(names) > 1
        for rel in names
    ]
    return sorted(unique), clashing


def _run_all(
    source: Path, out: Path, todo: list[str], config: CannyConfig, workers: int
) -> Iterator[tuple[str, str | None]]:
    chunks = [todo[i : i + _CHUNK] for i in range(0, len(todo), _CHUNK)]
    workers = workers or os.cpu_count() or 1
    if workers == 1 or len(chunks) <= 1:
        for chunk in chunks:
            yield from _condition_chunk(source, out, chunk, config)
        return
    context = multiprocessing.get_context("forkserver")  # as the scan: no fork of threads
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        futures = [pool.submit(_condition_chunk, source, out, c, config) for c in chunks]
        for future in futures:
            yield from future.result()


def _condition_chunk(
    source: Path, out: Path, chunk: Iterable[str], config: CannyConfig
) -> list[tuple[str, str | None]]:
    return [(rel, _condition_one(source, out, rel, config)) for rel in chunk]


def _condition_one(source: Path, out: Path, rel: str, config: CannyConfig) -> str | None:
    """Write one pair; the reason it could not, if it could not."""
    try:
        with Image.open(source / rel) as img:
            # The loader turns an image by its EXIF orientation: the map must match that.
            rgb = np.asarray(ImageOps.exif_transpose(img).convert("RGB"))
        edges = canny_map(rgb, config)
    except Exception as exc:  # one bad image (unreadable, a bomb, OpenCV's refusal) is reported
        return f"not a readable image: {exc}"
    _place_image(source / rel, out / "images" / rel)
    caption = (source / rel).with_suffix(".txt")
    if caption.is_file():
        _place_image(caption, (out / "images" / rel).with_suffix(".txt"))
    target = _conditioning_path(out, rel)
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(target) as fh:  # written last: its presence marks the pair complete
        edges.save(fh, format="PNG")
    return None


def _conditioning_path(out: Path, rel: str) -> Path:
    return (out / "conditioning" / rel).with_suffix(".png")


def _place_image(source: Path, target: Path) -> None:
    """`target` becomes `source`'s content: a hard link where possible, else a copy."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists() and os.path.samefile(source, target):
        return  # linked by an earlier run (renaming a link over its twin would do nothing)
    staged = target.with_name(f".{target.name}.partial")
    staged.unlink(missing_ok=True)
    try:
        os.link(source, staged)
    except OSError:  # another filesystem, or links not allowed
        shutil.copyfile(source, staged)
    os.replace(staged, target)
