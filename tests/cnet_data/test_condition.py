"""`cnet-data condition`: Canny maps of real photos, written as a dataset cnet indexes as is."""

from __future__ import annotations

import builtins
import os
import sys
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
from PIL import Image
from typing_extensions import override

from cnet_data.cli import main
from cnet_data.condition import CannyConfig, ConditionError, condition_folder
from cnet_data.index import DatasetIndex
from cnet_data.scan import ScanConfig, scan
from cnet_data.sources import SourceConfig

cv2 = pytest.importorskip("cv2")
skimage_data = pytest.importorskip("skimage.data")

PHOTOS = ("astronaut", "coffee", "chelsea")


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    """Three real photos from scikit-image, as JPEGs with captions, one in a sub-folder."""
    folder = tmp_path / "photos"
    (folder / "cats").mkdir(parents=True)
    for name in PHOTOS:
        rel = Path("cats", name) if name == "chelsea" else Path(name)
        Image.fromarray(getattr(skimage_data, name)()).save((folder / rel).with_suffix(".jpg"))
        (folder / rel).with_suffix(".txt").write_text(f"a photo: {name}\n")
    return folder


def test_canny_maps_of_real_photos_are_opencvs_and_index_as_a_folder_dataset(
    photos: Path, tmp_path: Path
) -> None:
    out = tmp_path / "dataset"
    report = condition_folder(photos, out, CannyConfig(80, 160), workers=1, progress=False)
    assert (report.written, report.skipped, report.failed) == (3, 0, [])
    for rel in ("astronaut", "coffee", "cats/chelsea"):
        rgb = np.asarray(Image.open(photos / f"{rel}.jpg").convert("RGB"))
        edges = np.asarray(Image.open(out / "conditioning" / f"{rel}.png"))
        assert edges.shape == (*rgb.shape[:2], 3)
        assert np.array_equal(edges[:, :, 0], cv2.Canny(rgb, 80, 160))
        assert np.array_equal(edges[:, :, 0], edges[:, :, 2])
        assert 0.01 < (edges > 0).mean() < 0.5  # a photo has edges, but is not all edge
    # Lower thresholds find more edges.
    loose = condition_folder(photos, tmp_path / "loose", CannyConfig(20, 40), progress=False)
    assert loose.written == 3
    many = np.asarray(Image.open(tmp_path / "loose" / "conditioning" / "coffee.png"))
    few = np.asarray(Image.open(out / "conditioning" / "coffee.png"))
    assert (many > 0).sum() > (few > 0).sum()

    builder, scanned = scan(SourceConfig(out), ScanConfig(workers=1), progress=False)
    assert scanned.accepted == 3 and scanned.bad == []
    builder.write(tmp_path / "index")
    index = DatasetIndex(tmp_path / "index")
    assert sorted(index.caption(i) for i in range(3)) == [f"a photo: {n}" for n in sorted(PHOTOS)]


def test_a_second_run_finishes_an_interrupted_one_and_redoes_nothing(
    photos: Path, tmp_path: Path
) -> None:
    out = tmp_path / "dataset"
    condition_folder(photos, out, workers=1, progress=False)
    done = out / "conditioning" / "coffee.png"
    os.utime(done, (1, 1))  # an untouched output keeps this time
    lost = out / "conditioning" / "astronaut.png"
    lost.unlink()  # as if killed before its rename
    again = condition_folder(photos, out, workers=2, progress=False)
    assert (again.written, again.skipped) == (1, 2)
    assert lost.is_file() and done.stat().st_mtime == 1
    assert not list(out.rglob("*.partial")) and not list(out.rglob(".*tmp*"))


def test_bad_input_is_refused_or_reported_by_name(
    photos: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(ConditionError, match="low <= high"):
        condition_folder(photos, tmp_path / "x", CannyConfig(200, 100), progress=False)
    with pytest.raises(ConditionError, match="inside the source folder"):
        condition_folder(photos, photos / "out", progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConditionError, match="no images under"):
        condition_folder(tmp_path / "empty", tmp_path / "y", progress=False)
    (photos / "broken.png").write_bytes(b"not an image")
    code = main(["condition", str(photos), "--out", str(tmp_path / "z"), "--quiet"])
    printed = capsys.readouterr().out
    assert code == 1
    assert "3 written, 0 already there, 1 unreadable" in printed
    assert "broken.png: not a readable image" in printed
    assert f"cnet-data index {tmp_path / 'z'}" in printed


def test_without_opencv_the_error_names_the_extra(
    photos: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_import = builtins.__import__

    def no_cv2(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "cv2":
            raise ImportError("No module named 'cv2'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_cv2)
    with pytest.raises(ConditionError, match="needs OpenCV") as refused:
        condition_folder(photos, tmp_path / "out", progress=False)
    assert "cnet-data[condition]" in refused.value.hint
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_the_map_follows_exif_orientation_and_name_clashes_are_reported(
    tmp_path: Path,
) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    turned = Image.fromarray(skimage_data.coffee())  # 600 wide, 400 high, stored turned
    exif = turned.getexif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to view
    turned.save(folder / "phone.jpg", exif=exif)
    Image.fromarray(skimage_data.chelsea()).save(folder / "cat.jpg")
    Image.fromarray(skimage_data.chelsea()).save(folder / "cat.png")
    report = condition_folder(folder, tmp_path / "out", workers=1, progress=False)
    assert report.written == 1
    assert sorted(image for image, _ in report.failed) == ["cat.jpg", "cat.png"]
    assert all("shares its name with" in reason for _, reason in report.failed)
    edges = Image.open(tmp_path / "out" / "conditioning" / "phone.png")
    assert edges.size == (400, 600)  # as the loader shows the photo: upright


def test_a_manifest_and_a_dataset_are_conditioned_with_their_captions(
    photos: Path, tmp_path: Path
) -> None:
    lines = [
        '{"image": "astronaut.jpg", "text": "an astronaut"}',
        '{"image": "cats/chelsea.jpg", "text": "a cat"}',
        '{"image": "../outside.jpg", "text": "x"}',
        '{"image": "coffee.jpg", "text": 7}',
        '{"image": "astronaut.jpg", "text": "an astronaut"}',
    ]
    (photos / "list.jsonl").write_text("\n".join(lines) + "\n")
    report = condition_folder(photos / "list.jsonl", tmp_path / "m", workers=1, progress=False)
    failed = dict(report.failed)
    assert report.written == 2 and sorted(failed) == [
        "astronaut.jpg",
        "list.jsonl:3",
        "list.jsonl:4",
    ]
    assert failed["astronaut.jpg"] == "listed again; the first listing is used"
    assert (tmp_path / "m" / "images" / "cats" / "chelsea.txt").read_text() == "a cat\n"
    assert os.path.samefile(tmp_path / "m" / "images" / "astronaut.jpg", photos / "astronaut.jpg")

    datasets = pytest.importorskip("datasets")
    table = datasets.Dataset.from_dict(
        {"image": [str(photos / "coffee.jpg")], "text": ["a coffee"]},
        features=datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")}),
    )
    table.to_parquet(str(tmp_path / "rows.parquet"))
    source = SourceConfig(tmp_path / "rows.parquet")
    assert condition_folder(source, tmp_path / "d", workers=1, progress=False).written == 1
    written = tmp_path / "d" / "images" / "rows" / "00000000.jpg"
    assert written.read_bytes() == (photos / "coffee.jpg").read_bytes()
    _, scanned = scan(SourceConfig(tmp_path / "d"), ScanConfig(workers=1), progress=False)
    assert scanned.accepted == 1


def _install_controlnet_aux(monkeypatch: pytest.MonkeyPatch, **detectors: type) -> None:
    """A stand-in `controlnet_aux` module holding `detectors`, for this test only."""
    fake = type(builtins)("controlnet_aux")
    for name, detector in detectors.items():
        setattr(fake, name, detector)
    monkeypatch.setitem(sys.modules, "controlnet_aux", fake)


class _Inverted:
    """Stands in for a controlnet_aux detector: works at 512 and returns a PIL image."""

    loaded_from: ClassVar[list[str]] = []

    @classmethod
    def from_pretrained(cls, where: str) -> _Inverted:
        cls.loaded_from.append(where)
        return cls()

    def __call__(self, image: Image.Image) -> Image.Image:
        gray = 255 - np.asarray(image.convert("L").resize((512, 512)))
        return Image.fromarray(gray)


def test_controlnet_aux_methods_draw_at_the_images_size(
    photos: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _install_controlnet_aux(monkeypatch, HEDdetector=_Inverted)
    args = ["condition", str(photos), "--out", str(tmp_path / "hed"), "--method", "hed"]
    assert main([*args, "--annotators", "/weights", "--workers", "1", "--quiet"]) == 0
    assert _Inverted.loaded_from == ["/weights"]  # once per process, not per image
    drawn = Image.open(tmp_path / "hed" / "conditioning" / "coffee.png")
    assert drawn.mode == "RGB" and drawn.size == Image.open(photos / "coffee.jpg").size
    monkeypatch.setitem(sys.modules, "controlnet_aux", None)  # as when it is not installed
    assert main([*args[:3], str(tmp_path / "x"), "--method", "depth"]) == 2
    assert "pip install controlnet-aux" in capsys.readouterr().err


class _Offline(_Inverted):
    @classmethod
    @override
    def from_pretrained(cls, where: str) -> _Inverted:
        raise OSError(f"cannot reach the hub for {where}")


def test_a_detector_that_cannot_load_is_one_error_before_any_image(
    photos: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _install_controlnet_aux(monkeypatch, MidasDetector=_Offline)
    out = tmp_path / "depth"
    assert main(["condition", str(photos), "--out", str(out), "--method", "depth"]) == 2
    err = capsys.readouterr().err
    assert "cannot load controlnet_aux's _Offline from lllyasviel/Annotators" in err
    assert not out.exists()
