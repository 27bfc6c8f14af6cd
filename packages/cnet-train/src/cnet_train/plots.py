"""Small pictures drawn with Pillow alone: the loss curve and image grids."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw

from cnet_data.atomic import atomic_open


def write_line_chart(
    xs: Sequence[float],
    ys: Sequence[float],
    path: Path,
    *,
    title: str,
    size: tuple[int, int] = (640, 360),
) -> None:
    """A line chart of ys over xs with its range labelled, saved as PNG (atomically)."""
    width, height = size
    margin = 48
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    lo, hi = min(ys), max(ys)
    span = (hi - lo) or 1.0
    x0, x1 = min(xs), max(xs)
    xspan = (x1 - x0) or 1.0

    def point(x: float, y: float) -> tuple[float, float]:
        px = margin + (x - x0) / xspan * (width - 2 * margin)
        py = height - margin - (y - lo) / span * (height - 2 * margin)
        return px, py

    draw.rectangle((margin, margin, width - margin, height - margin), outline=(180, 180, 180))
    if len(xs) > 1:
        draw.line([point(x, y) for x, y in zip(xs, ys, strict=True)], fill=(40, 90, 200), width=2)
    draw.text((margin, 12), title, fill="black")
    draw.text((4, margin - 6), f"{hi:.4g}", fill="black")
    draw.text((4, height - margin - 6), f"{lo:.4g}", fill="black")
    draw.text((margin, height - margin + 8), f"step {x0:g}", fill="black")
    draw.text((width - margin - 60, height - margin + 8), f"step {x1:g}", fill="black")
    save_png(img, path)


def image_grid(rows: Sequence[Sequence[Image.Image]]) -> Image.Image:
    """Images in a grid, each cell as large as the largest image."""
    cell_w = max(im.width for row in rows for im in row)
    cell_h = max(im.height for row in rows for im in row)
    grid = Image.new("RGB", (cell_w * max(len(r) for r in rows), cell_h * len(rows)), "white")
    for r, row in enumerate(rows):
        for c, im in enumerate(row):
            grid.paste(im.convert("RGB"), (c * cell_w, r * cell_h))
    return grid


def save_png(img: Image.Image, path: Path) -> None:
    """Save atomically: a reader never sees half a picture."""
    with atomic_open(path) as fh:
        img.save(fh, format="PNG")
