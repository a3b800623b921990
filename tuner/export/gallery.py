"""The sample gallery: a labelled PNG grid (one row per model and prompt, one column per seed) and an
``index.html`` beside it that shows the same images with their prompts and seeds."""

from __future__ import annotations

import html
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

from tuner.files import write_atomic
from tuner.sampling import to_uint8

LABEL_WIDTH = 260
PAD = 4


def _upscale(image: Image.Image, display_size: int) -> Image.Image:
    factor = max(1, -(-display_size // max(image.size)))
    return image.resize((image.width * factor, image.height * factor), Image.Resampling.NEAREST)


def labelled_grid(labels: list[str], rows: list[list[Image.Image]], seeds: list[int]) -> Image.Image:
    """One image of ``rows`` of cells under ``seed N`` headers, each row's label at its left."""
    cell_w, cell_h = rows[0][0].size
    header = 18
    grid = Image.new("RGB", (LABEL_WIDTH + len(seeds) * (cell_w + PAD), header + len(rows) * (cell_h + PAD)), "white")
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default(size=12)
    for j, seed in enumerate(seeds):
        draw.text((LABEL_WIDTH + j * (cell_w + PAD) + 2, 2), f"seed {seed}", fill="black", font=font)
    for i, (label, row) in enumerate(zip(labels, rows)):
        y = header + i * (cell_h + PAD)
        draw.text((4, y + cell_h // 2 - 6), label, fill="black", font=font)
        for j, cell in enumerate(row):
            grid.paste(cell, (LABEL_WIDTH + j * (cell_w + PAD), y))
    return grid


def cells_of(images: torch.Tensor, display_size: int) -> list[Image.Image]:
    """(N, 3, H, W) images in [-1, 1] as PIL images, small ones upscaled (nearest) to ``display_size``."""
    return [_upscale(Image.fromarray(a.numpy()), display_size) for a in to_uint8(images.detach().cpu())]


def write_gallery(folder: Path, rows: list[tuple[str, torch.Tensor]], seeds: list[int], display_size: int = 64) -> Path:
    """Write ``grid.png``, one PNG per cell and ``index.html`` into ``folder``.

    Args:
        rows: ``(label, images)`` pairs; ``images`` is (len(seeds), 3, H, W) in [-1, 1].
    Returns:
        The path of ``grid.png``.
    """
    folder.mkdir(parents=True, exist_ok=True)
    cells = [cells_of(images, display_size) for _, images in rows]
    cell_w = cells[0][0].size[0]
    table = []
    for i, ((label, _), row) in enumerate(zip(rows, cells)):
        tds = []
        for j, cell in enumerate(row):
            name = f"cells/row{i}_seed{seeds[j]}.png"
            (folder / "cells").mkdir(exist_ok=True)
            write_atomic(folder / name, cell)
            tds.append(f'<td><img src="{name}" width="{cell_w}" title="seed {seeds[j]}"></td>')
        table.append(f"<tr><th>{html.escape(label)}</th>{''.join(tds)}</tr>")
    path = write_atomic(folder / "grid.png", labelled_grid([label for label, _ in rows], cells, seeds))
    heads = "".join(f"<th>seed {s}</th>" for s in seeds)
    page = (
        "<!doctype html><meta charset=utf-8><title>tuner gallery</title>"
        "<style>body{font-family:sans-serif}img{image-rendering:pixelated}th{text-align:left}</style>"
        f"<h1>Samples</h1><table><tr><th></th>{heads}</tr>{''.join(table)}</table>"
        '<h2>Grid</h2><img src="grid.png">'
    )
    write_atomic(folder / "index.html", page)
    return path


def write_image_page(folder: Path, entries: list[dict]) -> Path:
    """``index.html`` beside generated images: each image with the prompt, seed and settings it was drawn with."""
    rows = []
    for e in entries:
        details = ", ".join(
            f"{k} {html.escape(str(v))}"
            for k, v in e.items()
            if k not in ("file", "prompt", "negative", "adapters") and v not in (None, "")
        )
        adapters = ", ".join(f"{html.escape(Path(a['path']).name)} x {a['weight']}" for a in e.get("adapters", []))
        rows.append(
            f'<tr><td><img src="{html.escape(e["file"])}" alt="{html.escape(e["prompt"])}"></td>'
            f"<td><b>{html.escape(e['prompt'])}</b>"
            + (f"<br>negative: {html.escape(e['negative'])}" if e.get("negative") else "")
            + f"<br><small>{details}</small>"
            + (f"<br><small>adapters: {adapters}</small>" if adapters else "")
            + "</td></tr>"
        )
    page = (
        "<!doctype html><meta charset=utf-8><title>tuner images</title>"
        "<style>body{font-family:sans-serif}img{image-rendering:pixelated;min-width:128px}td{padding:4px}</style>"
        f"<h1>Images</h1><table>{''.join(rows)}</table>"
    )
    return write_atomic(folder / "index.html", page)
