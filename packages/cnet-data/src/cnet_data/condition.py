"""`cnet-data condition`: make the conditioning images of a folder, manifest or dataset.

The output is a dataset cnet indexes as it is (the `folder` layout): `OUT/images/STEM.EXT` (a
hard link to the input image where the input is a local file and the filesystem allows, else a
copy of its bytes), its caption sidecar `OUT/images/STEM.txt` (the input's sidecar, or the
caption a manifest line or dataset row holds), and `OUT/conditioning/STEM.png`. Where the images
come from is `cnet_data.condition_inputs`; what is drawn (Canny, or a `controlnet_aux`
detector) is `cnet_data.condition_methods`.

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

import attrs
from PIL import Image, ImageOps
from tqdm import tqdm

from cnet_data.atomic import atomic_open, atomic_write_text
from cnet_data.condition_inputs import SourceImage, read_input
from cnet_data.condition_methods import AuxConfig, CannyConfig, ConditionError, MethodConfig, draw
from cnet_data.local_files import LocalFiles
from cnet_data.source_protocol import SampleStore
from cnet_data.sources import IMAGE_SUFFIXES, SourceConfig

_CHUNK = 16
DEFAULT_METHOD: MethodConfig = CannyConfig()
"""Canny with the annotator's thresholds."""
__all__ = ["CannyConfig", "ConditionError", "ConditionReport", "condition_folder"]


@attrs.define
class ConditionReport:
    """What a run did."""

    written: int = 0
    skipped: int = 0
    """Pairs already complete from an earlier run."""
    failed: list[tuple[str, str]] = attrs.Factory(list)
    """(image, reason) for each image that could not be read."""


def condition_folder(
    source: Path | SourceConfig,
    out: Path,
    config: MethodConfig = DEFAULT_METHOD,
    *,
    workers: int = 0,
    progress: bool = True,
) -> ConditionReport:
    """Write the folder-layout dataset of `source`'s images (a folder of images, a manifest
    or a dataset) and their conditioning images to `out`."""
    config.check()
    source = source if isinstance(source, SourceConfig) else SourceConfig(Path(source))
    given = read_input(source)
    root, out = given.store.root, Path(out).absolute()
    if not given.images:
        first = f"; first: {given.problems[0][0]}: {given.problems[0][1]}" if given.problems else ""
        hint = "give a folder of images, a manifest or a dataset"
        raise ConditionError(f"no images under {source.path}{first}", hint=hint)
    if given.walked and (out == root or root in out.parents):
        raise ConditionError(f"--out {out} is inside the source folder {root}; pick another")
    report = ConditionReport(failed=list(given.problems))
    images, clashes = _unique_stems(given.images)
    report.failed += clashes
    todo = [image for image in images if not _conditioning_path(out, image.stem).is_file()]
    report.skipped = len(images) - len(todo)
    bar = tqdm(total=len(todo), desc="conditioning", unit="image", disable=not progress)
    for where, problem in _run_all(given.store, out, todo, config, workers):
        bar.update()
        if problem is None:
            report.written += 1
        else:
            report.failed.append((where, problem))
    bar.close()
    return report


def _unique_stems(
    images: list[SourceImage],
) -> tuple[list[SourceImage], list[tuple[str, str]]]:
    """The images whose name without suffix is theirs alone (`a.jpg` and `a.png` would share
    `conditioning/a.png`), and a reason for each of the others."""
    by_stem: dict[str, list[SourceImage]] = {}
    repeated: list[tuple[str, str]] = []
    for image in images:
        same = by_stem.setdefault(image.stem, [])
        if any(other.reference == image.reference for other in same):
            repeated.append((image.reference, "listed again; the first listing is used"))
            continue
        same.append(image)
    unique = [found[0] for found in by_stem.values() if len(found) == 1]
    clashing = [
        (
            image.reference,
            f"shares its name with {', '.join(o.reference for o in found if o != image)}; "
            "rename one",
        )
        for found in by_stem.values()
        if len(found) > 1
        for image in found
    ]
    return sorted(unique, key=lambda image: image.stem), repeated + clashing


def _run_all(
    store: SampleStore, out: Path, todo: list[SourceImage], config: MethodConfig, workers: int
) -> Iterator[tuple[str, str | None]]:
    chunks = [todo[i : i + _CHUNK] for i in range(0, len(todo), _CHUNK)]
    # A detector runs torch on every core itself: one process each is oversubscription.
    workers = workers or (1 if isinstance(config, AuxConfig) else os.cpu_count() or 1)
    if workers == 1 or len(chunks) <= 1:
        for chunk in chunks:
            yield from _condition_chunk(store, out, chunk, config)
        return
    context = multiprocessing.get_context("forkserver")  # as the scan: no fork of threads
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        futures = [pool.submit(_condition_chunk, store, out, c, config) for c in chunks]
        for future in futures:
            yield from future.result()


def _condition_chunk(
    store: SampleStore, out: Path, chunk: Iterable[SourceImage], config: MethodConfig
) -> list[tuple[str, str | None]]:
    return [(image.reference, _condition_one(store, out, image, config)) for image in chunk]


def _condition_one(
    store: SampleStore, out: Path, image: SourceImage, config: MethodConfig
) -> str | None:
    """Write one pair; the reason it could not, if it could not."""
    try:
        with store.open(image.reference) as fh, Image.open(fh) as img:
            kind = (img.format or "PNG").lower()
            # The loader turns an image by its EXIF orientation: the map must match that.
            rgb = ImageOps.exif_transpose(img).convert("RGB")
            drawn = draw(rgb, config)
    except ConditionError:
        raise  # the method itself cannot run: not one image's fault
    except Exception as exc:  # one bad image (unreadable, a bomb, a detector's refusal)
        return f"not a readable image: {exc}"
    suffix = _suffix(image.reference, kind)
    target = out / "images" / f"{image.stem}{suffix or '.png'}"
    if suffix is None:  # a format the sources do not list (PPM, ICO, ...): stored as PNG
        target.parent.mkdir(parents=True, exist_ok=True)
        with atomic_open(target) as written:
            rgb.save(written, format="PNG")
    else:
        _place_image(store, image.reference, target)
    sidecar = out / "images" / f"{image.stem}.txt"
    if image.caption_file is not None:
        _place_image(store, image.caption_file, sidecar)
    elif image.caption is not None:
        atomic_write_text(sidecar, image.caption + "\n")
    conditioning = _conditioning_path(out, image.stem)
    conditioning.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(conditioning) as written:  # last: its presence marks the pair complete
        drawn.save(written, format="PNG")
    return None


def _suffix(reference: str, kind: str) -> str | None:
    """The output image's suffix: the input file's, or (a dataset cell) its format's; None
    when that is not one the sources read."""
    suffix = Path(reference).suffix
    if suffix.lower() in IMAGE_SUFFIXES:
        return suffix
    suffix = ".jpg" if kind in ("jpeg", "mpo") else f".{kind}"
    return suffix if suffix in IMAGE_SUFFIXES else None


def _conditioning_path(out: Path, stem: str) -> Path:
    return out / "conditioning" / f"{stem}.png"


def _place_image(store: SampleStore, reference: str, target: Path) -> None:
    """`target` gets the member's content: a hard link to a local file where possible, else
    a copy."""
    target.parent.mkdir(parents=True, exist_ok=True)
    source = store.path(reference) if isinstance(store, LocalFiles) else None
    if source is not None and target.exists() and os.path.samefile(source, target):
        return  # linked by an earlier run (renaming a link over its twin would do nothing)
    staged = target.with_name(f".{target.name}.partial")
    staged.unlink(missing_ok=True)
    try:
        if source is None:
            raise OSError("not a local file")
        os.link(source, staged)
    except OSError:  # another filesystem, links not allowed, or not a file at all
        with store.open(reference) as fh, open(staged, "wb") as copy:
            shutil.copyfileobj(fh, copy)
    os.replace(staged, target)
