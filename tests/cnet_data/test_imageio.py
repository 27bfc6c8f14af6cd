"""Decoding: orientation, colour modes, bit depths, draft decoding, and the header probe."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from cnet_data.buckets import Bucket
from cnet_data.geometry import plan_crop
from cnet_data.imageio import BadImageError, load_cropped, probe_image, to_rgb

LIMIT = 10_000_000


def _gradient(w: int, h: int) -> np.ndarray:
    x = np.linspace(0, 255, w, dtype=np.float32)[None, :, None]
    y = np.linspace(0, 255, h, dtype=np.float32)[:, None, None]
    return np.concatenate(
        [
            np.broadcast_to(x, (h, w, 1)),
            np.broadcast_to(y, (h, w, 1)),
            np.full((h, w, 1), 128, np.float32),
        ],
        axis=2,
    ).astype(np.uint8)


def test_exif_orientation_swaps_the_probed_size_and_rotates_pixels(tmp_path: Path) -> None:
    img = Image.fromarray(_gradient(60, 40))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    img.save(tmp_path / "r.jpg", exif=exif, quality=95)
    info = probe_image(tmp_path / "r.jpg", max_pixels=LIMIT)
    assert (info.width, info.height) == (40, 60)
    plan = plan_crop((60, 40), Bucket(40, 60), rng=None)
    out = np.asarray(load_cropped(tmp_path / "r.jpg", plan), dtype=np.float32)
    assert out.shape == (60, 40, 3)
    expected = np.rot90(_gradient(60, 40), k=-1).astype(np.float32)
    assert np.abs(out - expected).mean() < 4


def test_transparency_is_composited_over_white() -> None:
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 255  # red where opaque
    rgba[:2, :, 3] = 255  # top half opaque, bottom half fully transparent
    out = np.asarray(to_rgb(Image.fromarray(rgba, "RGBA")))
    assert out[0, 0].tolist() == [255, 0, 0]
    assert out[3, 3].tolist() == [255, 255, 255]  # not the hidden red
    la = Image.fromarray(
        np.stack([np.full((2, 2), 0, np.uint8), np.zeros((2, 2), np.uint8)], -1), "LA"
    )
    assert np.asarray(to_rgb(la)).tolist() == [[[255] * 3] * 2] * 2


def test_palette_with_transparency_is_composited() -> None:
    pal = Image.new("P", (2, 1))
    pal.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    pal.putpixel((0, 0), 0)
    pal.putpixel((1, 0), 1)
    pal.info["transparency"] = 0
    out = np.asarray(to_rgb(pal))
    assert out[0, 0].tolist() == [255, 255, 255]
    assert out[0, 1].tolist() == [10, 200, 30]


def test_sixteen_bit_greyscale_is_scaled_not_clipped(tmp_path: Path) -> None:
    values = np.array([[0, 32768, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "g16.png")
    with Image.open(tmp_path / "g16.png") as img:
        out = np.asarray(to_rgb(img))
    assert out[0, :, 0].tolist() == [0, 128, 255]
    assert (out[..., 0] == out[..., 2]).all()


def test_cmyk_and_greyscale_become_rgb(tmp_path: Path) -> None:
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(tmp_path / "c.jpg", quality=100)
    with Image.open(tmp_path / "c.jpg") as img:
        assert img.mode == "CMYK"
        red = np.asarray(to_rgb(img))[4, 4]
    assert red[0] > 200 and red[1] < 60 and red[2] < 60
    grey = to_rgb(Image.new("L", (3, 3), 77))
    assert grey.mode == "RGB" and np.asarray(grey)[1, 1].tolist() == [77, 77, 77]


def test_draft_decoding_matches_full_decoding(tmp_path: Path) -> None:
    Image.fromarray(_gradient(1600, 1200)).save(tmp_path / "big.jpg", quality=95)
    plan = plan_crop((1200, 1600), Bucket(256, 192), rng=None)
    fast = np.asarray(load_cropped(tmp_path / "big.jpg", plan), dtype=np.float32)
    with Image.open(tmp_path / "big.jpg") as img:
        slow = img.convert("RGB").resize((256, 192), Image.Resampling.BICUBIC)
    assert fast.shape == (192, 256, 3)
    assert np.abs(fast - np.asarray(slow, dtype=np.float32)).mean() < 2.0


def test_flip_mirrors_the_crop(tmp_path: Path) -> None:
    Image.fromarray(_gradient(64, 32)).save(tmp_path / "g.png")
    plan = plan_crop((32, 64), Bucket(64, 32), rng=None)
    flipped = plan_crop((32, 64), Bucket(64, 32), rng=np.random.default_rng(0), flip_probability=1)
    a = np.asarray(load_cropped(tmp_path / "g.png", plan))
    b = np.asarray(load_cropped(tmp_path / "g.png", flipped))
    assert (a[:, ::-1] == b).all()


def _png_with_declared_size(path: Path, width: int, height: int) -> None:
    """A valid small PNG whose header then claims another size (CRC fixed up)."""
    Image.new("RGB", (4, 4)).save(path)
    data = bytearray(path.read_bytes())
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF)
    path.write_bytes(bytes(data))


def test_probe_rejects_a_bomb_from_its_header_without_decoding(tmp_path: Path) -> None:
    _png_with_declared_size(tmp_path / "bomb.png", 5000, 4000)  # 20 MP declared, 4x4 stored
    with pytest.raises(BadImageError, match="20000000 pixels exceeds") as info:
        probe_image(tmp_path / "bomb.png", max_pixels=LIMIT)
    assert info.value.kind == "decompression_bomb"


@pytest.mark.parametrize("suffix", [".jpg", ".png", ".webp"])
def test_probe_finds_truncated_files(tmp_path: Path, suffix: str) -> None:
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(tmp_path / f"a{suffix}")
    data = (tmp_path / f"a{suffix}").read_bytes()
    (tmp_path / f"t{suffix}").write_bytes(data[: len(data) * 2 // 3])
    assert probe_image(tmp_path / f"a{suffix}", max_pixels=LIMIT).width == 64
    with pytest.raises(BadImageError) as info:
        probe_image(tmp_path / f"t{suffix}", max_pixels=LIMIT)
    assert info.value.kind in {"truncated", "unreadable"}


def test_probe_names_empty_missing_and_garbage_files(tmp_path: Path) -> None:
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "junk.png").write_bytes(b"not an image at all" * 10)
    kinds = {}
    for name in ("empty.png", "junk.png", "absent.png"):
        with pytest.raises(BadImageError) as info:
            probe_image(tmp_path / name, max_pixels=LIMIT)
        kinds[name] = info.value.kind
    assert kinds == {
        "empty.png": "empty_file",
        "junk.png": "unreadable",
        "absent.png": "missing_file",
    }


@pytest.mark.parametrize("suffix", [".jpg", ".png", ".webp"])
def test_probe_of_a_complete_file_decodes_no_pixels(
    tmp_path: Path, suffix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    exif = Image.Exif()
    exif[0x0112] = 8
    Image.fromarray(_gradient(30, 20)).save(tmp_path / f"a{suffix}", exif=exif)

    def no_decoding(self: Image.Image) -> None:
        raise AssertionError("the probe decoded pixels")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    info = probe_image(tmp_path / f"a{suffix}", max_pixels=LIMIT)
    assert (info.width, info.height) == (20, 30)  # orientation 8 swaps, read from the header
