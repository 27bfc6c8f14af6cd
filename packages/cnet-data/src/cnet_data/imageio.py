"""Reading images: header probes for the index, and fast oriented RGB decoding for training.

The probe reads only what the header and the file's tail say (size, EXIF orientation, whether the
file is complete), so indexing never decodes pixels unless asked to. Decoding applies a crop plan
directly to the source: JPEG DCT scaling ("draft") and a resize of just the crop box avoid
resampling pixels that would be cropped away.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import BinaryIO, Literal

import attrs
import numpy as np
from PIL import ExifTags, Image, ImageOps

from cnet_data.geometry import CropPlan

VerifyMode = Literal["header", "decode"]
"""`header`: size from the header plus a check that the file is complete; `decode`: full decode."""

DEFAULT_MAX_PIXELS = 178_956_970
"""Twice Pillow's warning threshold: the point at which Pillow itself refuses to open a file."""

_SWAPPING_ORIENTATIONS = frozenset({5, 6, 7, 8})
_TAIL_BYTES = 4096


class BadImageError(Exception):
    """A file that cannot be used; the message says why, without the path (callers add it)."""

    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(reason)
        self.kind = kind
        """A short machine-readable category, e.g. `truncated` or `decompression_bomb`."""
        self.reason = reason


@attrs.frozen
class ImageInfo:
    """What the index needs to know about one image file."""

    width: int
    """Width after EXIF orientation is applied."""
    height: int
    """Height after EXIF orientation is applied."""
    format: str
    mode: str


def allow_pixels(limit: int) -> None:
    """Let Pillow open images up to `limit` pixels: our own header check enforces the limit.

    Pillow raises above twice its own (process-wide) threshold; raise that threshold when the
    user's limit is higher, never lower it.
    """
    current = Image.MAX_IMAGE_PIXELS
    if current is not None and limit > 2 * current:
        Image.MAX_IMAGE_PIXELS = (limit + 1) // 2


def probe_image(
    source: Path | BinaryIO, *, max_pixels: int, verify: VerifyMode = "header"
) -> ImageInfo:
    """Size, format and mode of the image at `source` (a path, or a seekable binary file that
    a `SampleStore` opened), or `BadImageError` saying what is wrong with it."""
    if not isinstance(source, (str, os.PathLike)):
        return _probe_stream(source, max_pixels, verify)
    try:
        with open(source, "rb") as fh:
            return _probe_stream(fh, max_pixels, verify)
    except FileNotFoundError:
        raise BadImageError("missing_file", "file does not exist") from None
    except OSError as exc:  # the stream's own errors are BadImageError already
        raise BadImageError("unreadable", f"cannot open file: {exc.strerror}") from None


def _probe_stream(fh: BinaryIO, max_pixels: int, verify: VerifyMode) -> ImageInfo:
    try:
        size = fh.seek(0, os.SEEK_END)
        fh.seek(0)
    except OSError as exc:
        raise BadImageError("unreadable", f"cannot read file: {exc.strerror}") from None
    if size == 0:
        raise BadImageError("empty_file", "empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(fh) as img:
                info = _header_info(img)
                _check_pixels(info, max_pixels)
                if verify == "decode" or not _tail_is_complete(fh, img.format, size):
                    _full_decode(img)
    except BadImageError:
        raise
    except Image.DecompressionBombError as exc:
        raise BadImageError("decompression_bomb", f"decompression bomb: {exc}") from None
    except (OSError, SyntaxError, ValueError) as exc:
        # Pillow reports unreadable and truncated data as OSError (UnidentifiedImageError
        # included) and some malformed headers as SyntaxError or ValueError.
        # Pillow names the file it was given; for an in-memory member that is an object repr.
        reason = str(exc).replace(f" {fh!r}", "")
        raise BadImageError("unreadable", f"not a readable image: {reason}") from None
    return info


def exif_orientation(img: Image.Image) -> int:
    """The EXIF orientation tag (1 when absent), read from the header only.

    Pillow's PNG reader decodes the whole image to look for an eXIf chunk after the pixel data;
    such late chunks are ignored here, at probe and at load alike, so both agree on the size.
    """
    if img.format == "PNG" and "exif" not in img.info:
        return 1
    value = img.getexif().get(ExifTags.Base.Orientation, 1)
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _header_info(img: Image.Image) -> ImageInfo:
    width, height = img.size
    orientation = exif_orientation(img)
    if orientation in _SWAPPING_ORIENTATIONS:
        width, height = height, width
    return ImageInfo(width=width, height=height, format=img.format or "unknown", mode=img.mode)


def _check_pixels(info: ImageInfo, max_pixels: int) -> None:
    pixels = info.width * info.height
    if pixels > max_pixels:
        raise BadImageError(
            "decompression_bomb",
            f"decompression bomb: {info.width}x{info.height} = {pixels} pixels exceeds the "
            f"limit of {max_pixels}",
        )


def _tail_is_complete(fh: BinaryIO, fmt: str | None, size: int) -> bool:
    """Whether the file ends the way a complete file of its format must.

    Formats without such a marker answer False, which sends them to a full decode. The file's
    position is restored: Pillow may go on reading from it.
    """
    position = fh.tell()
    try:
        if fmt == "WEBP":
            fh.seek(0)
            header = fh.read(8)
            return len(header) == 8 and int.from_bytes(header[4:8], "little") + 8 <= size
        fh.seek(max(0, size - _TAIL_BYTES))
        tail = fh.read()
    finally:
        fh.seek(position)
    if fmt == "JPEG":
        # 0xFFD9 (end of image) cannot occur inside entropy-coded data, which stuffs 0xFF bytes.
        return b"\xff\xd9" in tail
    if fmt == "PNG":
        return b"IEND" in tail
    if fmt == "GIF":
        return tail.rstrip(b"\x00").endswith(b"\x3b")
    return False


def _full_decode(img: Image.Image) -> None:
    try:
        img.load()
    except OSError as exc:
        raise BadImageError("truncated", f"truncated or corrupt image data: {exc}") from None


def to_rgb(img: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Any Pillow mode as 8-bit RGB.

    Transparency is composited over `background` (dropping alpha would expose whatever colour
    the transparent pixels happen to hold); 16- and 32-bit integer images are scaled, not
    clipped, to 8 bits; CMYK and the other colour spaces go through Pillow's conversions.
    """
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        grey = np.asarray(img).astype(np.float32)
        peak = 65535.0 if mode.startswith("I;16") or grey.max(initial=0) > 255 else 255.0
        scaled = np.clip(grey * (255.0 / peak) + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(scaled).convert("RGB")
    if mode == "F":
        scaled = np.clip(np.asarray(img) * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(scaled).convert("RGB")
    if mode == "P" and "transparency" in img.info:
        img, mode = img.convert("RGBA"), "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return img.convert("RGB")


def load_cropped(
    source: Path | BinaryIO,
    plan: CropPlan,
    *,
    resample: Image.Resampling = Image.Resampling.BICUBIC,
) -> Image.Image:
    """Decode `source` (a path or a binary file) and apply `plan`: the bucket-sized RGB crop,
    flipped if the plan says so."""
    with Image.open(source) as img:
        orientation = exif_orientation(img)
        swaps = orientation in _SWAPPING_ORIENTATIONS
        oriented_size = img.size[::-1] if swaps else img.size
        if oriented_size != (plan.original_size[1], plan.original_size[0]):
            raise BadImageError(
                "size_changed",
                f"size {oriented_size[0]}x{oriented_size[1]} differs from the indexed "
                f"{plan.original_size[1]}x{plan.original_size[0]}; re-index the dataset",
            )
        rh, rw = plan.resized_size
        # Ask the JPEG decoder for the smallest DCT scale that still covers the resized image.
        img.draft(img.mode, (rh, rw) if swaps else (rw, rh))
        img.load()
        rgb = to_rgb(ImageOps.exif_transpose(img) if orientation != 1 else img)
        # Scale the crop box from original to decoded coordinates (they differ after a draft).
        fx = rgb.width / plan.original_size[1]
        fy = rgb.height / plan.original_size[0]
        left, top, right, bottom = plan.source_box()
        box = (left * fx, top * fy, right * fx, bottom * fy)
        th, tw = plan.target_size
        # Resize only the crop box: pixels that would be cropped away are never resampled.
        out = rgb.resize((tw, th), resample, box=box, reducing_gap=3.0)
    if plan.flip:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return out
