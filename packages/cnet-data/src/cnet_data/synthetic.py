"""A generated "fill" dataset: a filled shape on a background, its outline as the condition.

The task of the original ControlNet tutorial, made offline: the conditioning image is the shape's
outline, the caption names the colours and the shape, and the model must learn to fill it. Used
by the demos, the tests and the benchmarks; sizes vary so that several buckets are populated.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator, Sequence
from pathlib import Path

import attrs
import numpy as np
from PIL import Image, ImageDraw

from cnet_data.atomic import atomic_write_text
from cnet_data.shard_writer import ShardWriter

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 210, 40),
    "purple": (140, 60, 180),
    "orange": (240, 140, 30),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle")
DEFAULT_SIZES = ((64, 64), (96, 64), (64, 96))
"""(width, height) pairs cycled through: a square, a landscape and a portrait bucket."""


def write_fill_dataset(
    root: Path,
    count: int,
    *,
    sizes: Sequence[tuple[int, int]] = DEFAULT_SIZES,
    seed: int = 0,
    image_suffix: str = ".png",
    sidecars: bool = False,
) -> Path:
    """Write `count` samples under `root` and return the JSONL manifest's path.

    Layout: `images/NNNNNN<suffix>`, `conditioning/NNNNNN.png`, `manifest.jsonl` (keys `image`,
    `conditioning_image`, `text`); with `sidecars`, also `images/NNNNNN.txt` captions, which
    makes `root` a valid folder-layout source too.
    """
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "conditioning").mkdir(parents=True, exist_ok=True)
    lines = []
    for i, sample in enumerate(fill_samples(count, sizes=sizes, seed=seed)):
        image, outline, caption = sample.image, sample.outline, sample.caption
        stem = f"{i:06d}"
        image.save(root / "images" / f"{stem}{image_suffix}")
        outline.save(root / "conditioning" / f"{stem}.png")
        if sidecars:
            (root / "images" / f"{stem}.txt").write_text(caption + "\n", encoding="utf-8")
        lines.append(
            json.dumps(
                {
                    "image": f"images/{stem}{image_suffix}",
                    "conditioning_image": f"conditioning/{stem}.png",
                    "text": caption,
                }
            )
        )
    manifest = root / "manifest.jsonl"
    atomic_write_text(manifest, "\n".join(lines) + "\n")
    return manifest


def write_fill_shards(
    folder: Path,
    count: int,
    *,
    samples_per_shard: int = 1000,
    sizes: Sequence[tuple[int, int]] = DEFAULT_SIZES,
    seed: int = 0,
) -> list[Path]:
    """Write the samples `write_fill_dataset` writes (same `seed` and `sizes`, same order) as
    tar shards under `folder`, as img2dataset lays them out: `NNNNNN.png`, `NNNNNN.cond.png`,
    `NNNNNN.txt` and `NNNNNN.json` (its width and height). Returns the shards' paths."""
    with ShardWriter(folder, samples_per_shard=samples_per_shard) as writer:
        for i, sample in enumerate(fill_samples(count, sizes=sizes, seed=seed)):
            width, height = sample.image.size
            meta = {"key": f"{i:06d}", "width": width, "height": height}
            writer.add(
                f"{i:06d}",
                {
                    "png": _png(sample.image),
                    "cond.png": _png(sample.outline),
                    "txt": sample.caption.encode("utf-8"),
                    "json": json.dumps(meta).encode("utf-8"),
                },
            )
    return writer.shards


def _png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


@attrs.frozen
class FillSample:
    """One generated sample, in memory."""

    image: Image.Image
    """The filled shape on its background (RGB)."""
    outline: Image.Image
    """The conditioning image: the shape's white outline on black (RGB, same size)."""
    caption: str
    """The colours and the shape; never where the shape is, which only the outline says."""


def fill_samples(
    count: int, *, sizes: Sequence[tuple[int, int]] = DEFAULT_SIZES, seed: int = 0
) -> Iterator[FillSample]:
    """The samples `write_fill_dataset` writes, without writing them (e.g. to pre-fit a base
    model on the same distribution); the same `seed` and `sizes` give the same samples."""
    rng = np.random.default_rng(seed)
    names = list(COLOURS)
    for i in range(count):
        width, height = sizes[i % len(sizes)]
        fill, background = rng.choice(len(names), size=2, replace=False)
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        image, outline = _draw(
            (width, height), shape, COLOURS[names[fill]], COLOURS[names[background]], rng
        )
        caption = f"a {names[fill]} {shape} on a {names[background]} background"
        yield FillSample(image, outline, caption)


def _draw(
    size: tuple[int, int],
    shape: str,
    fill: tuple[int, int, int],
    background: tuple[int, int, int],
    rng: np.random.Generator,
) -> tuple[Image.Image, Image.Image]:
    width, height = size
    side = int(min(width, height) * rng.uniform(0.35, 0.7))
    left = int(rng.integers(0, width - side + 1))
    top = int(rng.integers(0, height - side + 1))
    box = (left, top, left + side - 1, top + side - 1)
    image = Image.new("RGB", size, background)
    outline = Image.new("RGB", size, (0, 0, 0))
    line = max(1, min(width, height) // 32)
    for canvas, kwargs in (
        (image, {"fill": fill}),
        (outline, {"outline": (255, 255, 255), "width": line}),
    ):
        draw = ImageDraw.Draw(canvas)
        if shape == "circle":
            draw.ellipse(box, **kwargs)
        elif shape == "square":
            draw.rectangle(box, **kwargs)
        else:
            apex = (left + side // 2, top)
            draw.polygon(
                [apex, (left, top + side - 1), (left + side - 1, top + side - 1)], **kwargs
            )
    return image, outline
