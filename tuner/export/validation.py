"""Validation galleries: samples at fixed prompts and seeds every N training steps, gathered into a page that grows
during the run, and a comparison page across the runs of a Hydra multirun sweep.

An edit run's page edits fixed pairs instead of prompts: a row shows each pair's control(s) and target once, the
step-0 row the base model's edits, every later row the fine-tuned edits; each step's grid (what the trackers get)
has a row per pair: control(s) | base | this step's edits | target."""

from __future__ import annotations

import html
import json
import os
from pathlib import Path
from urllib.parse import quote

import torch

from tuner.errors import ConfigError
from tuner.export.charts import line_chart
from tuner.export.gallery import cells_of, labelled_grid, shown
from tuner.files import inside, write_atomic

STYLE = (
    "<style>body{font-family:sans-serif}img{image-rendering:pixelated}th{text-align:left;vertical-align:top}"
    "td,th{padding:2px 4px}tr.chosen{background:#fde8e8}.chart{margin:4px}</style>"
)


def _src(path: str) -> str:
    """A relative file path as an HTML attribute value (URL-quoted, then escaped)."""
    return html.escape(quote(Path(path).as_posix()))


def _img(path: str, alt: str) -> str:
    return f'<img src="{_src(path)}" alt="{html.escape(alt)}" title="{html.escape(alt)}">'


# the order numbers are shown in (the rest follow by name)
ORDER = ["train_loss", "val_loss", "val_loss_class", "score", "fidelity", "preservation", "drift"]


def _number(value) -> str:
    return "" if value is None else f"{value:.4g}"


def _header(prompts: list[str], seeds: list[int], lead: list[str], last: str, numbers: list[str] = ()) -> str:
    """Two header rows: each prompt over its seeds' columns, then ``seed N`` per column (then ``numbers``)."""
    heads = "".join(f'<th rowspan="2">{h}</th>' for h in lead)
    tops = "".join(f'<th colspan="{len(seeds)}">{html.escape(p)}</th>' for p in prompts)
    tops += "".join(f'<th rowspan="2">{n}</th>' for n in numbers)
    seed_row = "".join(f"<th>seed {s}</th>" for _ in prompts for s in seeds)
    return f'<tr>{heads}{tops}<th rowspan="2">{last}</th></tr><tr>{seed_row}</tr>'


def step_files(step: int, prompts: int, seeds: list[int]) -> dict:
    """The files of validation step ``step``, relative to the validation folder: the grid and each cell (by prompt,
    then seed). Always derived from the step, never read back from ``steps.json``: a resumed run deletes the files
    of the steps it samples again, and a name read from a file must not choose what is deleted."""
    return {
        "grid": f"step_{step:06d}.png",
        "cells": [[f"cells/step_{step:06d}_p{k}_s{seed}.png" for seed in seeds] for k in range(prompts)],
    }


def read_steps(record: Path) -> dict:
    """A validation folder's ``steps.json``, each step's files derived anew from its number and its numbers kept.

    Raises:
        ConfigError: the file is not what tuner writes (not JSON, a step that is not a whole number, ...).
    """
    try:
        data = json.loads(record.read_text())
        prompts, seeds = list(data["prompts"]), list(data["seeds"])
        if not all(isinstance(p, str) for p in prompts) or not all(type(x) is int for x in seeds):
            raise ValueError("prompts and seeds")
        steps = []
        for e in data["steps"]:
            step, values = e["step"], e.get("values", {})
            if type(step) is not int or step < 0 or not isinstance(values, dict):
                raise ValueError(f"step {step!r}")
            values = {str(k): v for k, v in values.items() if v is None or type(v) in (int, float)}
            steps.append({"step": step, **step_files(step, len(prompts), seeds), "values": values})
        chosen = data.get("chosen")
        if chosen is not None and not (isinstance(chosen, dict) and type(chosen.get("step")) is int):
            raise ValueError("chosen")
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ConfigError(
            f"{record} is damaged ({e}): tuner wrote it as a record of validation steps; remove it (the page "
            "starts again) or restore it"
        ) from e
    return {"prompts": prompts, "seeds": seeds, "steps": steps, "chosen": chosen}


class ValidationGallery:
    """Validation samples taken every N training steps at fixed prompts and seeds; grows during the run."""

    def __init__(self, folder: Path, prompts: list[str], seeds: list[int], display_size: int = 64, pairs=()):
        self.folder, self.prompts, self.seeds, self.display_size = (
            Path(folder),
            list(prompts),
            list(seeds),
            display_size,
        )
        # an edit run's pairs (``tuner.sampling.Pair``, one per prompt): their controls' and targets' files
        self.pairs = [self._pair_files(k, pair) for k, pair in enumerate(pairs)]
        self._pairs_written = False  # (by the first ``add``: rank 0 alone writes)
        self._entries: list[dict] = []
        self.chosen: dict | None = None  # {"step", "note"}: the step the run's weights come from
        record = self.folder / "steps.json"
        if record.exists():  # a resumed run continues its page (if it samples the same prompts and seeds)
            data = read_steps(record)
            if data.get("prompts") == self.prompts and data.get("seeds") == self.seeds:
                self._entries = data["steps"]

    def _pair_files(self, k: int, pair) -> dict:
        """Pair ``k``'s control(s) and target as the page shows them: their files' names and images."""
        target = shown(pair.target, self.display_size) if pair.target is not None else None
        side = max(target.size) if target is not None else None
        files = {"controls": [], "target": None, "images": []}
        for j, control in enumerate(pair.controls):
            files["controls"].append(f"pairs/p{k}_control{j}.png")
            files["images"].append(shown(control, self.display_size, side))
        files["target"] = f"pairs/p{k}_target.png" if target is not None else None
        files["target_image"] = target
        return files

    def _write_pairs(self) -> None:
        for files in self.pairs:
            for name, image in zip(files["controls"], files["images"]):
                write_atomic(self.folder / name, image)
            if files["target"]:
                write_atomic(self.folder / files["target"], files["target_image"])
        self._pairs_written = True

    @property
    def steps(self) -> list[int]:
        return [e["step"] for e in self._entries]

    def values(self) -> dict[str, list[tuple[int, float]]]:
        """Each number recorded so far (losses, metrics) as (step, value) pairs."""
        series: dict[str, list[tuple[int, float]]] = {}
        for e in self._entries:
            for name, value in e.get("values", {}).items():
                series.setdefault(name, []).append((e["step"], value))
        return series

    def add(self, step: int, images, values: dict[str, float] | None = None) -> Path:
        """Save step ``step``'s samples (prompt-major, (len(prompts) * len(seeds), 3, H, W) in [-1, 1]; an edit run:
        a list of one (len(seeds), 3, H, W) tensor per pair) as a labelled grid and one PNG per cell, and its numbers
        (``values``: losses, metrics), record them in ``steps.json`` and rewrite ``index.html`` (with a chart of
        each number). Returns the grid path."""
        n = len(self.seeds)
        images = torch.cat(images) if isinstance(images, list) and not self.pairs else images
        count = sum(t.shape[0] for t in images) if isinstance(images, list) else images.shape[0]
        if count != len(self.prompts) * n:
            raise ValueError(f"expected {len(self.prompts) * n} images, got {count}")
        if isinstance(images, list):
            rows = [cells_of(t, self.display_size) for t in images]
        else:
            cells = cells_of(images, self.display_size)
            rows = [cells[k * n : (k + 1) * n] for k in range(len(self.prompts))]
        if not self._pairs_written:
            self._write_pairs()
        entry = {"step": step, **step_files(step, len(self.prompts), self.seeds), "values": dict(values or {})}
        names = entry["cells"]
        for row, row_names in zip(rows, names):
            for cell, name in zip(row, row_names):
                write_atomic(self.folder / name, cell)
        path = write_atomic(self.folder / entry["grid"], self._grid(step, rows))
        dropped = [e for e in self._entries if e["step"] >= step]  # a resumed run re-samples these steps
        self._entries = [e for e in self._entries if e["step"] < step] + [entry]
        self._write()
        keep = {entry["grid"], *(c for row in names for c in row)}
        for old in dropped:  # files of replaced steps that this step did not overwrite
            for name in [old["grid"], *(c for row in old["cells"] for c in row)]:
                if name not in keep:  # never through a link out of the folder
                    inside(self.folder, name, self.folder / "steps.json").unlink(missing_ok=True)
        return path

    def _grid(self, step: int, rows: list[list]):
        """The step's grid: a row per prompt of its seeds; an edit run's: control(s) | base | step | target."""
        if not self.pairs:
            return labelled_grid(self.prompts, rows, self.seeds)
        most = max(len(p["controls"]) for p in self.pairs)
        base = next((e for e in self._entries if e["step"] == 0), None) if step else None
        heads = ["control"] * most + [f"base\nseed {s}" for s in self.seeds] * (base is not None)
        heads += [f"step {step}\nseed {s}" for s in self.seeds] + ["target"]
        grid_rows = []
        for k, (pair, row) in enumerate(zip(self.pairs, rows)):
            cells = pair["images"] + [None] * (most - len(pair["images"]))
            if base is not None:
                cells += [_open(self.folder / name) for name in base["cells"][k]]
            grid_rows.append(cells + row + [pair["target_image"]])
        return labelled_grid(self.prompts, grid_rows, self.seeds, heads)

    def mark(self, step: int, note: str) -> None:
        """Mark ``step`` as the one the run's weights come from (``note`` says why) on the page and its charts."""
        self.chosen = {"step": step, "note": note}
        self._write()

    def _write(self) -> None:
        record = {"prompts": self.prompts, "seeds": self.seeds, "steps": self._entries, "chosen": self.chosen}
        write_atomic(self.folder / "steps.json", json.dumps(record, indent=2))
        write_atomic(self.folder / "index.html", self._page())

    def _page(self) -> str:
        series = self.values()
        # fidelity and preservation repeat the metric they stand for (e.g. dino): shown once, under its own name
        aliases = {n for n in ("fidelity", "preservation") if any(series.get(n) == series[k] for k in series if k != n)}
        series = {k: v for k, v in series.items() if k not in aliases}
        names = sorted(series, key=lambda n: (n not in ORDER, ORDER.index(n) if n in ORDER else 0, n))
        chosen = self.chosen["step"] if self.chosen else None
        note = f"step {chosen}: {self.chosen['note']}" if self.chosen else ""
        charts = "".join(line_chart(name, series[name], chosen, f"step {chosen}" if chosen else "") for name in names)
        rows = []
        for e in self._entries:
            step = e["step"]
            tds = "".join(
                f"<td>{_img(cell, f'step {step}, {prompt}, seed {seed}')}</td>"
                for prompt, row in zip(self.prompts, e["cells"])
                for seed, cell in zip(self.seeds, row)
            )
            numbers = "".join(f"<td>{_number(e.get('values', {}).get(n))}</td>" for n in names)
            mark = ' class="chosen"' if step == chosen else ""
            label = f"{step} (base)" if self.pairs and step == 0 else step
            rows.append(f'<tr{mark}><th>{label}</th>{tds}{numbers}<td><a href="{_src(e["grid"])}">grid</a></td></tr>')
        header = _header(self.prompts, self.seeds, ["step"], "grid", [html.escape(n) for n in names])
        if self.pairs:  # each pair's control(s) -> target, over its seeds' columns
            refs = "".join(
                f'<td colspan="{len(self.seeds)}">'
                + " ".join(_img(c, f"control {j + 1}") for j, c in enumerate(p["controls"]))
                + (f" &rarr; {_img(p['target'], 'target')}" if p["target"] else "")
                + "</td>"
                for p in self.pairs
            )
            header += f'<tr><th>control(s) &rarr; target</th>{refs}<td colspan="{len(names) + 1}"></td></tr>'
        return (
            f"<!doctype html><meta charset=utf-8><title>tuner validation</title>{STYLE}"
            f"<h1>Validation samples</h1>{f'<p>{html.escape(note)}</p>' if note else ''}"
            f"<div>{charts}</div><table>{header}{''.join(rows)}</table>"
        )


def _open(path: Path):
    """A cell written earlier (the base's, step 0), or None where it is gone."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except OSError:
        return None


def write_sweep_gallery(folder: Path, runs: list[tuple[str, Path]]) -> Path:
    """A Hydra multirun's comparison page: ``folder/index.html`` with one row per run (labelled with its overrides),
    showing its last validation step's cells (from ``RUN/validation/steps.json``) and its final gallery
    (``RUN/gallery/grid.png``) if present. Image paths are relative to ``folder``. Returns the page path."""
    folder = Path(folder)
    records = []
    for _, run in runs:
        record = Path(run) / "validation" / "steps.json"
        data = read_steps(record) if record.exists() else {}
        records.append(data if data.get("steps") else None)
    first = next((d for d in records if d), {"prompts": [], "seeds": []})
    prompts, seeds = first["prompts"], first["seeds"]
    width = max([len(d["prompts"]) * len(d["seeds"]) for d in records if d] + [0])
    rows = []
    for (label, run), data in zip(runs, records):
        run = Path(run)
        if data is None:
            cells = f'<td colspan="{width + 1}"><i>no validation samples</i></td>'
        else:
            step, names = data["steps"][-1]["step"], data["steps"][-1]["cells"]
            shown = [
                _img(os.path.relpath(run / "validation" / c, folder), f"{label}, step {step}, {p}, seed {s}")
                for p, row in zip(data["prompts"], names)
                for s, c in zip(data["seeds"], row)
            ]
            cells = f"<td>{step}</td>" + "".join(f"<td>{i}</td>" for i in shown) + "<td></td>" * (width - len(shown))
        grid = run / "gallery" / "grid.png"
        final = _img(os.path.relpath(grid, folder), f"{label}, final gallery") if grid.exists() else "<i>none</i>"
        rows.append(f"<tr><th>{html.escape(label)}</th>{cells}<td>{final}</td></tr>")
    head = _header(prompts, seeds, ["run", "step"], "final gallery")
    page = (
        f"<!doctype html><meta charset=utf-8><title>tuner sweep</title>{STYLE}"
        f"<h1>Sweep: last validation step per run</h1><table>{head}{''.join(rows)}</table>"
    )
    return write_atomic(folder / "index.html", page)
