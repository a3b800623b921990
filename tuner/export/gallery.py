"""The sample gallery: a labelled PNG grid (one row per model and prompt, one column per seed) and an
``index.html`` beside it that shows the same images with their prompts and seeds. An edit family's gallery has one
row per pair: its control(s) | the base model's edit | the fine-tuned edit (at each seed) | its target."""

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


def labelled_grid(
    labels: list[str], rows: list[list[Image.Image | None]], seeds: list[int], heads: list[str] | None = None
) -> Image.Image:
    """One image of ``rows`` of cells under ``seed N`` headers (or ``heads``, each of one or more lines), each row's
    label at its left. Cells of other sizes are centred in the largest one's box; a None cell is left blank."""
    cell_w = max(c.size[0] for row in rows for c in row if c is not None)
    cell_h = max(c.size[1] for row in rows for c in row if c is not None)
    heads = heads or [f"seed {seed}" for seed in seeds]
    header = 4 + 14 * max(h.count("\n") + 1 for h in heads)  # a head may have lines
    grid = Image.new("RGB", (LABEL_WIDTH + len(heads) * (cell_w + PAD), header + len(rows) * (cell_h + PAD)), "white")
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default(size=12)
    for j, head in enumerate(heads):
        draw.multiline_text((LABEL_WIDTH + j * (cell_w + PAD) + 2, 2), head, fill="black", font=font, spacing=2)
    for i, (label, row) in enumerate(zip(labels, rows)):
        y = header + i * (cell_h + PAD)
        draw.text((4, y + cell_h // 2 - 6), label, fill="black", font=font)
        for j, cell in enumerate(row):
            if cell is not None:
                x = LABEL_WIDTH + j * (cell_w + PAD) + (cell_w - cell.size[0]) // 2
                grid.paste(cell, (x, y + (cell_h - cell.size[1]) // 2))
    return grid


def shown(image: Image.Image, display_size: int, largest: int | None = None) -> Image.Image:
    """A control or a target as a cell: a small one upscaled (nearest) to ``display_size``, one larger than
    ``largest`` (the edits' side) made that size, its aspect kept."""
    image = _upscale(image.convert("RGB"), display_size)
    if largest and max(image.size) > largest:
        image = image.copy()
        image.thumbnail((largest, largest), Image.Resampling.LANCZOS)
    return image


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


def write_edit_gallery(folder: Path, rows: list[tuple], seeds: list[int], display_size: int = 64) -> Path:
    """An edit family's gallery in ``folder``: ``grid.png``, one PNG per cell and ``index.html``, one row per pair:
    its control(s) | the base's edit at each seed | the fine-tuned edit at each seed | its target.

    Args:
        rows: ``(label, controls, base, tuned, target)``: the pair's controls (PIL, as given), the base's and the
            fine-tuned model's edits ((len(seeds), 3, H, W) in [-1, 1]) and its target (PIL, or None).
    Returns:
        The path of ``grid.png``.
    """
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cells").mkdir(exist_ok=True)
    most = max(len(controls) for _, controls, *_ in rows)
    heads = [f"control {k + 1}" if most > 1 else "control" for k in range(most)]
    heads += [f"base\nseed {s}" for s in seeds] + [f"fine-tuned\nseed {s}" for s in seeds] + ["target"]
    grid_rows, table = [], []
    for i, (label, controls, base, tuned, target) in enumerate(rows):
        edits = cells_of(base, display_size) + cells_of(tuned, display_size)
        side = max(edits[0].size)
        named = [(f"cells/row{i}_control{k}.png", shown(c, display_size, side)) for k, c in enumerate(controls)]
        named += [(None, None)] * (most - len(controls))
        named += [(f"cells/row{i}_base_seed{s}.png", c) for s, c in zip(seeds, edits[: len(seeds)])]
        named += [(f"cells/row{i}_tuned_seed{s}.png", c) for s, c in zip(seeds, edits[len(seeds) :])]
        named.append(
            (f"cells/row{i}_target.png", shown(target, display_size, side)) if target is not None else (None, None)
        )
        tds = []
        for (name, cell), head in zip(named, heads):
            if name is None:
                tds.append("<td></td>")
                continue
            write_atomic(folder / name, cell)
            tds.append(f'<td><img src="{name}" width="{cell.size[0]}" title="{html.escape(head)}"></td>')
        table.append(f"<tr><th>{html.escape(label)}</th>{''.join(tds)}</tr>")
        grid_rows.append([cell for _, cell in named])
    path = write_atomic(folder / "grid.png", labelled_grid([r[0] for r in rows], grid_rows, seeds, heads))
    heads = [h.replace("\n", ", ") for h in heads]
    page = (
        "<!doctype html><meta charset=utf-8><title>tuner gallery</title>"
        "<style>body{font-family:sans-serif}img{image-rendering:pixelated}th{text-align:left}</style>"
        f"<h1>Edits</h1><p>Each pair: its control(s), the base model's edit and the fine-tuned model's at the same "
        f"seeds, and its target.</p><table><tr><th></th>{''.join(f'<th>{html.escape(h)}</th>' for h in heads)}</tr>"
        f"{''.join(table)}</table>"
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
            if k not in ("file", "prompt", "negative", "adapters", "controls", "control_files") and v not in (None, "")
        )
        controls = "".join(
            f'<img src="{html.escape(f)}" alt="control {k + 1}" title="{html.escape(Path(c).name)}">'
            for k, (f, c) in enumerate(zip(e.get("control_files", []), e.get("controls", [])))
        )
        adapters = ", ".join(f"{html.escape(Path(a['path']).name)} x {a['weight']}" for a in e.get("adapters", []))
        rows.append(
            (f"<tr><td>{controls} &rarr;</td>" if controls else "<tr>")
            + f'<td><img src="{html.escape(e["file"])}" alt="{html.escape(e["prompt"])}"></td>'
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
