"""Atomic writes: a crash mid-write leaves the previous file or folder whole and no debris."""

import pytest
from PIL import Image

from tuner.files import atomic_dir, write_atomic


def test_failed_folder_write_keeps_the_previous_folder(tmp_path):
    target = tmp_path / "adapter"
    with atomic_dir(target) as tmp:
        (tmp / "weights").write_text("v1")
    with pytest.raises(RuntimeError), atomic_dir(target) as tmp:
        (tmp / "weights").write_text("half of v2")
        raise RuntimeError("killed mid-write")
    assert (target / "weights").read_text() == "v1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_write_atomic_text_bytes_and_images(tmp_path):
    write_atomic(tmp_path / "a.txt", "hello")
    write_atomic(tmp_path / "b.bin", b"\x00\x01")
    write_atomic(tmp_path / "c.png", Image.new("RGB", (3, 2), (1, 2, 3)))
    assert (tmp_path / "a.txt").read_text() == "hello"
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    assert Image.open(tmp_path / "c.png").getpixel((2, 1)) == (1, 2, 3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.bin", "c.png"]


def test_outputs_get_the_usual_permissions(tmp_path):
    import os

    mask = os.umask(0o022)
    try:
        write_atomic(tmp_path / "f.txt", "x")
        with atomic_dir(tmp_path / "d") as tmp:
            (tmp / "g").write_text("y")
    finally:
        os.umask(mask)
    assert (tmp_path / "f.txt").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o755
