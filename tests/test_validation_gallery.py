"""The growing validation gallery and the sweep comparison page: files, resume, and the pages as a browser sees them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers import broken, images, serve
from tuner.export.gallery import LABEL_WIDTH, PAD, write_gallery
from tuner.export.validation import ValidationGallery, write_sweep_gallery
from tuner.sampling import to_uint8

PROMPTS = ['a "red" <circle> & square', "the digit 7"]
SEEDS = [0, 1, 5]


def colours(step: int) -> torch.Tensor:
    """(6, 3, 8, 8) solid images in [-1, 1], a distinct colour per step and cell."""
    n = len(PROMPTS) * len(SEEDS)
    values = torch.tensor(
        [[(step * 7 + i * 37) % 255, (i * 40) % 255, step % 255] for i in range(n)], dtype=torch.float
    )
    return (values / 127.5 - 1).view(n, 3, 1, 1).expand(n, 3, 8, 8).clone()


def fill(folder: Path, steps: list[int]) -> ValidationGallery:
    gallery = ValidationGallery(folder, PROMPTS, SEEDS)
    for step in steps:
        gallery.add(step, colours(step))
    return gallery


def test_files_and_resume(tmp_path):
    folder = tmp_path / "validation"
    gallery = fill(folder, [10, 20, 30])
    assert gallery.steps == [10, 20, 30]
    for step in (10, 20, 30):
        assert (folder / f"step_{step:06d}.png").is_file()
        for k in range(len(PROMPTS)):
            for seed in SEEDS:
                assert (folder / "cells" / f"step_{step:06d}_p{k}_s{seed}.png").is_file()
    cell = Image.open(folder / "cells" / "step_000020_p1_s1.png")
    assert cell.size == (64, 64)  # 8x8 upscaled by nearest to the display size
    expected = to_uint8(colours(20))[1 * len(SEEDS) + 1, 0, 0].numpy()
    assert (np.asarray(cell.convert("RGB")) == expected).all()
    grid = Image.open(folder / "step_000030.png")
    assert grid.size == (LABEL_WIDTH + len(SEEDS) * (64 + PAD), 18 + len(PROMPTS) * (64 + PAD))
    record = json.loads((folder / "steps.json").read_text())
    assert record["prompts"] == PROMPTS and record["seeds"] == SEEDS
    assert [e["step"] for e in record["steps"]] == [10, 20, 30]
    assert record["steps"][0]["grid"] == "step_000010.png"
    assert record["steps"][0]["cells"][1] == [f"cells/step_000010_p1_s{s}.png" for s in SEEDS]
    page = (folder / "index.html").read_text()
    assert "&quot;red&quot; &lt;circle&gt; &amp; square" in page and "<circle>" not in page
    assert page.count("<img") == 18 and 'href="step_000030.png"' in page

    resumed = ValidationGallery(folder, PROMPTS, SEEDS)  # a resumed run picks up the recorded steps
    assert resumed.steps == [10, 20, 30]
    resumed.add(20, colours(99))  # ... and re-samples step 20, which replaces steps 20 and 30
    assert resumed.steps == [10, 20]
    assert [e["step"] for e in json.loads((folder / "steps.json").read_text())["steps"]] == [10, 20]
    assert not (folder / "step_000030.png").exists() and not (folder / "cells" / "step_000030_p0_s0.png").exists()
    again = Image.open(folder / "cells" / "step_000020_p0_s0.png").convert("RGB")
    assert (np.asarray(again) == to_uint8(colours(99))[0, 0, 0].numpy()).all()
    assert (folder / "index.html").read_text().count("<img") == 12


def test_wrong_image_count(tmp_path):
    with pytest.raises(ValueError, match="expected 6 images"):
        ValidationGallery(tmp_path, PROMPTS, SEEDS).add(1, colours(1)[:5])


def test_validation_page_in_chromium(tmp_path, browser):
    fill(tmp_path / "validation", [10, 20, 30])
    with serve(tmp_path) as base:
        found, alts = images(browser, f"{base}/validation/index.html")
        assert len(found) == 3 * len(PROMPTS) * len(SEEDS)
        assert broken(found) == []
        assert alts[len(SEEDS) + 2] == f"step 10, {PROMPTS[1]}, seed {SEEDS[2]}"

        (tmp_path / "validation" / "cells" / "step_000020_p1_s5.png").unlink()  # the check can fail
        found, _ = images(browser, f"{base}/validation/index.html")
        assert len(found) == 18
        assert broken(found) == [f"{base}/validation/cells/step_000020_p1_s5.png"]


def test_sweep_page_in_chromium(tmp_path, browser):
    sweep = tmp_path / "multirun"
    fill(sweep / "0" / "validation", [5, 10])
    fill(sweep / "1" / "validation", [5, 10, 15])
    write_gallery(sweep / "1" / "gallery", [("tuned", colours(1)[:3])], SEEDS)
    (sweep / "2").mkdir()  # a run that never sampled
    runs = [("adapter.rank=4", sweep / "0"), ("adapter.rank=8", sweep / "1"), ("adapter.rank=16", sweep / "2")]
    path = write_sweep_gallery(sweep, runs)
    text = path.read_text()
    assert "no validation samples" in text and "adapter.rank=16" in text and 'src="0/validation/cells/' in text
    with serve(tmp_path) as base:
        found, alts = images(browser, f"{base}/multirun/index.html")
        assert len(found) == 2 * len(PROMPTS) * len(SEEDS) + 1
        assert broken(found) == []
        srcs = [i["src"] for i in found]
        assert f"{base}/multirun/0/validation/cells/step_000010_p0_s0.png" in srcs
        assert f"{base}/multirun/1/validation/cells/step_000015_p1_s5.png" in srcs
        assert srcs[-1] == f"{base}/multirun/1/gallery/grid.png" and alts[-1] == "adapter.rank=8, final gallery"

        shutil.rmtree(sweep / "1" / "gallery")  # the page is unchanged, so its grid image now breaks
        assert broken(images(browser, f"{base}/multirun/index.html")[0]) == [f"{base}/multirun/1/gallery/grid.png"]

        # pages outside the sweep folder still find the runs' images (relative paths via os.path.relpath)
        write_sweep_gallery(tmp_path / "elsewhere", runs[:1])
        found, _ = images(browser, f"{base}/elsewhere/index.html")
        assert len(found) == 6 and broken(found) == []
