"""The prepare stage on a folder of real files, good and bad: every file is kept or rejected with a
reason, kept images are standardized, and the source folder is never modified."""

import hashlib
import io
import os
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tuner.data.prepare import load_prepared, prepare_folder
from tuner.data_config import DataConfig


def _png(size=(40, 30), color=(200, 10, 10), mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, format="PNG")
    return buf.getvalue()


def _tree_digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()
    }


@pytest.fixture
def messy(tmp_path) -> Path:
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "red.png").write_bytes(_png())
    (src / "red.txt").write_text("  a   red\nsquare  ")
    (src / "red_copy.png").write_bytes(_png())  # exact duplicate
    (src / "sub" / "blue.jpg").write_bytes(_jpeg_rotated())
    rgba = Image.new("RGBA", (32, 32), (0, 0, 255, 0))  # fully transparent: must land on the background
    rgba.save(src / "clear.png")
    Image.new("P", (20, 20), 3).save(src / "palette.png")
    Image.new("I;16", (20, 20), 40000).save(src / "sixteen.png")
    (src / "empty.png").write_bytes(b"")
    (src / "notes.md").write_text("not an image")
    (src / "broken.png").write_bytes(_png((64, 64), (1, 2, 3))[:60])
    (src / "tiny.png").write_bytes(_png((4, 4)))
    (src / "badcap.png").write_bytes(_png((33, 33), (0, 200, 0)))
    (src / "badcap.txt").write_bytes(b"\xff\xfe\xfa caption")
    Image.new("I;16B", (20, 20), 0).save(src / "bigendian.tif")  # black 16-bit big-endian TIFF
    Image.new("LA", (20, 20), (0, 0)).save(src / "clear_gray.png")
    Image.new("CMYK", (20, 20), (0, 0, 0, 255)).save(src / "cmyk.jpg")
    (src / ".DS_Store").write_bytes(b"\x00\x01")
    (src / "orphan.txt").write_text("a caption with no image")
    Image.new("RGB", (400, 10), (10, 200, 10)).save(src / "panorama.png")
    (src / "bomb.png").write_bytes(_png_header(30000, 30000))  # 900 megapixels claimed by a tiny file
    from sklearn.datasets import load_sample_images

    (src / "photos").mkdir()
    for name in load_sample_images().filenames:  # real photographs (JPEG, 640x427)
        shutil.copy(name, src / "photos" / Path(name).name)
    Image.new("RGB", (16, 16)).save(src / "icon.ico")
    outside = tmp_path / "secret.png"
    outside.write_bytes(_png((50, 50), (9, 9, 9)))
    os.symlink(outside, src / "link.png")
    return src


def _png_header(width: int, height: int) -> bytes:
    """A PNG that claims ``width`` x ``height`` in its header and holds no pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", b"") + chunk(b"IEND", b"")


def _jpeg_rotated() -> bytes:
    """A 40x20 JPEG whose EXIF says rotate 90 degrees: upright it is 20 wide and 40 tall."""
    image = Image.new("RGB", (40, 20), (0, 0, 250))
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    image.save(buf, format="JPEG", exif=exif)
    return buf.getvalue()


def test_every_file_is_accounted_for_and_sources_untouched(messy, tmp_path):
    before = _tree_digest(messy)
    settings = DataConfig(resolution=16, min_side=8)
    report = prepare_folder(messy, tmp_path / "out", settings, default_caption="a photo of sks thing")
    assert _tree_digest(messy) == before

    assert sorted(report.kept) == [
        "bigendian.tif",
        "clear.png",
        "clear_gray.png",
        "cmyk.jpg",
        "palette.png",
        "panorama.png",
        "photos/china.jpg",
        "photos/flower.jpg",
        "red.png",
        "sixteen.png",
        "sub/blue.jpg",
    ]
    assert report.rejected == {
        "hidden file": [".DS_Store"],
        "caption file without an image": ["orphan.txt"],
        "duplicate": ["red_copy.png"],
        "zero-byte file": ["empty.png"],
        "not an image": ["notes.md"],
        "truncated or corrupt": ["broken.png"],
        "smaller than min_side=8": ["tiny.png"],
        "caption not UTF-8": ["badcap.png"],
        "outside the dataset root": ["link.png"],
        "decompression bomb (too many pixels)": ["bomb.png"],
        "unsupported format (ICO)": ["icon.ico"],
    }
    seen = set(report.kept) | {f for files in report.rejected.values() for f in files}
    captions = {"red.txt", "badcap.txt"}  # read with their images
    every_file = {str(p.relative_to(messy)) for p in messy.rglob("*") if not p.is_dir()}
    assert seen == every_file - captions

    rows = {r["source"]: r for r in load_prepared(tmp_path / "out")}
    for row in rows.values():
        assert row["image"].size == (16, 16) and row["image"].mode == "RGB"
    assert rows["red.png"]["caption"] == "a red square"
    assert rows["palette.png"]["caption"] == "a photo of sks thing"
    assert rows["sub/blue.jpg"]["original_size"] == [20, 40]  # EXIF rotation applied
    assert np.asarray(rows["clear.png"]["image"]).min() == 255  # transparent -> white background
    assert np.asarray(rows["clear_gray.png"]["image"]).min() == 255
    assert np.asarray(rows["bigendian.tif"]["image"]).max() == 0
    assert np.asarray(rows["sixteen.png"]["image"]).mean() == pytest.approx(40000 / 256, abs=1.5)
    assert np.asarray(rows["cmyk.jpg"]["image"]).max() < 40  # K=100% is black
    assert rows["panorama.png"]["original_size"] == [400, 10] and rows["panorama.png"]["crop"] == [0, 312]
    assert np.abs(np.asarray(rows["panorama.png"]["image"]).astype(int) - [10, 200, 10]).max() <= 2
    red = np.asarray(rows["red.png"]["image"]).reshape(-1, 3).mean(0)
    assert abs(red[0] - 200) < 3 and red[1] < 15
    assert rows["red.png"]["sha256"] == hashlib.sha256((messy / "red.png").read_bytes()).hexdigest()


def test_rerun_with_same_inputs_does_nothing_and_change_redoes(messy, tmp_path):
    settings = DataConfig(resolution=16)
    prepare_folder(messy, tmp_path / "out", settings)
    arrow = next((tmp_path / "out" / "dataset").glob("*.arrow"))
    stamp = arrow.stat().st_mtime_ns
    prepare_folder(messy, tmp_path / "out", settings)
    assert arrow.stat().st_mtime_ns == stamp
    (messy / "green.png").write_bytes(_png((30, 30), (0, 255, 0)))
    report = prepare_folder(messy, tmp_path / "out", settings)
    assert "green.png" in report.kept


def test_center_crop_keeps_the_middle(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    image = Image.new("RGB", (48, 16), (0, 0, 0))
    image.paste((255, 255, 255), (16, 0, 32, 16))  # white middle third
    image.save(src / "wide.png")
    prepare_folder(src, tmp_path / "out", DataConfig(resolution=16))
    row = load_prepared(tmp_path / "out")[0]
    assert np.asarray(row["image"]).min() > 240
    assert row["crop"] == [0, 16]


def test_missing_source_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        prepare_folder(tmp_path / "nowhere", tmp_path / "out", DataConfig(resolution=16))


def test_squash_mode_keeps_the_whole_image(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    image = Image.new("RGB", (48, 16), (0, 0, 0))
    image.paste((255, 255, 255), (0, 0, 8, 16))  # white left edge, lost by a center crop
    image.save(src / "wide.png")
    prepare_folder(src, tmp_path / "out", DataConfig(resolution=16, crop="none"))
    assert np.asarray(load_prepared(tmp_path / "out")[0]["image"])[:, 0].min() > 200


def test_loss_masks_are_cropped_with_their_image(tmp_path):
    """photo.mask.png gets exactly photo.png's resize and crop; a stray mask is reported."""
    src = tmp_path / "src"
    src.mkdir()
    image = Image.new("RGB", (60, 20), (0, 0, 0))
    mask = Image.new("L", (60, 20), 0)
    for x in range(30, 40):  # a white stripe in the middle third of both
        for y in range(20):
            image.putpixel((x, y), (255, 255, 255))
            mask.putpixel((x, y), 255)
    image.save(src / "photo.png")
    mask.save(src / "photo.mask.png")
    Image.new("RGB", (20, 20)).save(src / "plain.png")
    Image.new("L", (20, 20)).save(src / "orphan.mask.png")
    Image.new("L", (10, 10)).save(src / "wrong.mask.png")
    Image.new("RGB", (20, 20), (9, 9, 9)).save(src / "wrong.png")
    report = prepare_folder(src, tmp_path / "out", DataConfig(resolution=20))
    assert sorted(report.kept) == ["photo.png", "plain.png"]
    assert report.rejected["mask file without an image"] == ["orphan.mask.png"]
    assert any("mask size" in reason for reason in report.rejected)
    rows = {row["source"]: row for row in load_prepared(tmp_path / "out")}
    assert rows["plain.png"]["mask"] is None
    pixels = np.asarray(rows["photo.png"]["image"].convert("L")) / 255.0
    masked = np.asarray(rows["photo.png"]["mask"]) / 255.0
    assert np.abs(pixels - masked).max() < 0.2  # same geometry: the stripe lands in the same columns
    assert masked[:, 11:].mean() > 0.9 and masked[:, :9].max() < 0.1  # center crop: x 30..39 -> 10..19
