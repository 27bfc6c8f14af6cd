"""Small pictures drawn with Pillow alone: the loss curve (with the control gain) and image
grids."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import attrs
from PIL import Image, ImageDraw, ImageFont

from cnet_data.atomic import atomic_open

_MARGIN = 48
_BLUE = (40, 90, 200)
_ORANGE = (220, 110, 20)
_GREY = (180, 180, 180)


@attrs.frozen
class Series:
    """One panel's curve: points over optimizer steps."""

    xs: Sequence[float]
    ys: Sequence[float]
    title: str
    colour: tuple[int, int, int] = _BLUE
    markers: bool = False
    """Draw each point (for sparse series such as the control gain)."""
    reference: float | None = None
    """A horizontal dashed line at this value (the gain of 1: no use of the condition)."""
    min_span: float = 0.0
    """The least value range the panel shows (so that a flat series near the reference line
    does not fill the panel with float noise)."""


def write_line_chart(
    xs: Sequence[float],
    ys: Sequence[float],
    path: Path,
    *,
    title: str,
    size: tuple[int, int] = (640, 360),
) -> None:
    """A line chart of ys over xs with its range labelled, saved as PNG (atomically)."""
    write_panels([Series(xs, ys, title)], path, panel_size=size)


def write_panels(
    panels: Sequence[Series], path: Path, *, panel_size: tuple[int, int] = (640, 360)
) -> None:
    """Panels stacked top to bottom on one step axis (the union of their step ranges), so that
    points at one step line up across panels; saved as PNG (atomically)."""
    width, height = panel_size
    img = Image.new("RGB", (width, height * len(panels)), "white")
    draw = ImageDraw.Draw(img)
    all_x = [x for p in panels for x in p.xs]
    x_range = (min(all_x), max(all_x)) if all_x else (0.0, 1.0)
    for row, series in enumerate(panels):
        _panel(draw, (0, row * height, width, height), series, x_range)
    save_png(img, path)


def _panel(
    draw: ImageDraw.ImageDraw,
    box: tuple[int, int, int, int],
    series: Series,
    x_range: tuple[float, float],
) -> None:
    left, top, width, height = box
    values = [*series.ys, *([] if series.reference is None else [series.reference])]
    lo, hi = (min(values), max(values)) if values else (0.0, 1.0)
    if hi - lo < series.min_span:
        centre = (lo + hi) / 2
        lo, hi = centre - series.min_span / 2, centre + series.min_span / 2
    span = (hi - lo) or 1.0
    x0, x1 = x_range
    xspan = (x1 - x0) or 1.0

    def point(x: float, y: float) -> tuple[float, float]:
        px = left + _MARGIN + (x - x0) / xspan * (width - 2 * _MARGIN)
        py = top + height - _MARGIN - (y - lo) / span * (height - 2 * _MARGIN)
        return px, py

    draw.rectangle(
        (left + _MARGIN, top + _MARGIN, left + width - _MARGIN, top + height - _MARGIN),
        outline=_GREY,
    )
    if series.reference is not None:
        _dashed(draw, point(x0, series.reference), point(x1, series.reference))
        ref_x, ref_y = point(x1, series.reference)
        draw.text((ref_x + 4, ref_y - 6), f"{series.reference:g}", fill=_GREY)
    pts = [point(x, y) for x, y in zip(series.xs, series.ys, strict=True)]
    if len(pts) > 1:
        draw.line(pts, fill=series.colour, width=2)
    if series.markers:
        for px, py in pts:
            draw.ellipse((px - 3, py - 3, px + 3, py + 3), fill=series.colour)
    draw.text((left + _MARGIN, top + 12), series.title, fill="black")
    draw.text((left + 4, top + _MARGIN - 6), f"{hi:.4g}", fill="black")
    draw.text((left + 4, top + height - _MARGIN - 6), f"{lo:.4g}", fill="black")
    draw.text((left + _MARGIN, top + height - _MARGIN + 8), f"step {x0:g}", fill="black")
    draw.text(
        (left + width - _MARGIN - 60, top + height - _MARGIN + 8), f"step {x1:g}", fill="black"
    )


def _dashed(
    draw: ImageDraw.ImageDraw, start: tuple[float, float], end: tuple[float, float]
) -> None:
    (xa, y), (xb, _) = start, end
    x = xa
    while x < xb:
        draw.line([(x, y), (min(x + 6, xb), y)], fill=_GREY, width=1)
        x += 12


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


Font = ImageFont.ImageFont | ImageFont.FreeTypeFont | ImageFont.TransposedFont

LABEL_LINES = 4
"""Lines of a caption under a grid column at most; a longer prompt ends in an ellipsis."""

MIN_LABELLED_WIDTH = 128
"""Narrowest column of a labelled grid: a 64-pixel image would leave a few letters a line."""


def labelled_grid(
    columns: Sequence[Sequence[Image.Image]], labels: Sequence[str], *, pad: int = 4
) -> Image.Image:
    """Images in columns, one label (a prompt) drawn under each column, with PIL's default font.

    Every image keeps its own size and so its aspect ratio: it is centred in a cell as large
    as the largest image (never stretched to a square), so a wide conditioning image and the
    image generated from it read as what they are. Long labels wrap to the column's width.
    """
    if len(columns) != len(labels):
        raise ValueError(f"{len(columns)} columns but {len(labels)} labels")
    font = ImageFont.load_default()
    cell_w = max(MIN_LABELLED_WIDTH, *(im.width for col in columns for im in col)) + pad
    cell_h = max(im.height for col in columns for im in col) + pad
    rows = max(len(col) for col in columns)
    wrapped = [_wrap(label, font, cell_w - 2 * pad) for label in labels]
    line_h = _line_height(font)
    label_h = max(len(lines) for lines in wrapped) * line_h + 2 * pad
    grid = Image.new("RGB", (cell_w * len(columns), cell_h * rows + label_h), "white")
    draw = ImageDraw.Draw(grid)
    for c, (col, lines) in enumerate(zip(columns, wrapped, strict=True)):
        for r, im in enumerate(col):
            x = c * cell_w + (cell_w - im.width) // 2
            y = r * cell_h + (cell_h - im.height) // 2
            grid.paste(im.convert("RGB"), (x, y))
        for i, line in enumerate(lines):
            draw.text((c * cell_w + pad, cell_h * rows + pad + i * line_h), line, "black", font)
    return grid


def _line_height(font: Font) -> int:
    return int(font.getbbox("Ag")[3]) + 3


def _wrap(text: str, font: Font, width: int) -> list[str]:
    """`text` in lines no wider than `width` pixels (a single overlong word is cut), at most
    `LABEL_LINES` of them."""
    lines: list[str] = []
    for word in text.split() or [""]:
        candidate = f"{lines[-1]} {word}" if lines else word
        if lines and font.getlength(candidate) <= width:
            lines[-1] = candidate
        else:
            lines.append(_cut(word, font, width))
    if len(lines) > LABEL_LINES:
        lines = lines[:LABEL_LINES]
        lines[-1] = _cut(lines[-1] + "...", font, width, ellipsis=True)
    return lines


def _cut(text: str, font: Font, width: int, *, ellipsis: bool = False) -> str:
    """`text` shortened from the end until it fits in `width` (ending in "..." if `ellipsis`)."""
    tail = "..." if ellipsis else ""
    body = text.removesuffix(tail)
    while body and font.getlength(body + tail) > width:
        body = body[:-1]
    return body + tail
