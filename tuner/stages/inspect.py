"""The inspect stage (rank 0, recipe=inspect): what an adapter file is, read from its header
(tuner/export/inspection.py): format, family, rank and alpha per module, metadata, trigger words. With
``model.path``, which of its modules that base would not load, and a gallery of the base without and with it.
Writes ``inspect.json`` (every module), ``README.md`` and a printed summary.
"""

from __future__ import annotations

import json
from pathlib import Path

from tuner.base_model import base_folder
from tuner.errors import ConfigError
from tuner.export.inspection import Described, describe
from tuner.export.live import Gallery
from tuner.export.loading import apply_lora, load_checkpoint
from tuner.files import write_atomic
from tuner.stages.context import Base, Run, stage


def _check_inspect(cfg) -> None:
    if not cfg.checkpoint:
        raise ConfigError("checkpoint= is not set: pass the adapter to inspect (a file, an export or a run folder)")
    try:
        describe(Path(cfg.checkpoint))
    except ConfigError as e:
        raise ConfigError(f"checkpoint: {e}") from None


@stage(main_only=True, writes=("inspect.json", "README.md", "gallery"), check=_check_inspect)
def inspect(run: Run) -> None:
    """Say what an adapter is: format, family, rank and alpha per module, metadata, trigger words; with
    ``model.path``, which of its keys this base would not load, and a gallery of the base with and without it."""
    path = Path(run.cfg.checkpoint).expanduser()
    d = describe(path)
    report = {
        "path": str(d.path),
        "format": d.format,
        "kind": d.kind,
        "families": list(d.families),
        "family_evidence": d.evidence,
        "modules_per_component": d.counts(),
        "ranks": dict(sorted(_tally(m.rank for m in d.modules.values()).items(), key=lambda kv: str(kv[0]))),
        "alphas": dict(sorted(_tally(m.alpha for m in d.modules.values()).items(), key=lambda kv: str(kv[0]))),
        "triggers": d.triggers,
        "metadata": {k: (v if len(v) <= 2000 else v[:2000] + "...") for k, v in d.metadata.items()},
        "modules": [
            {
                "module": m.name,
                "component": m.component,
                "kind": m.kind,
                "rank": m.rank,
                "alpha": m.alpha,
                "shape": list(m.shape),
            }
            for m in d.modules.values()
        ],
    }
    if run.cfg.model.path or run.cfg.model.builtin:
        run.results[Base] = Base(base_folder(run))
        report["base"] = str(run.base)
        report["not_loading"] = _not_loading(run, path, d)
        if not report["not_loading"]["error"]:
            gallery = Gallery(run, d.triggers)
            gallery.add("base", None)
            gallery.add(d.path.name, "inspected")
            gallery.write()
    run.outputs["inspect"] = str(write_atomic(run.dir / "inspect.json", json.dumps(report, indent=2)))
    run.outputs["model_card"] = str(write_atomic(run.dir / "README.md", _inspect_card(report)))
    print(_inspect_text(report), flush=True)


def _tally(values) -> dict:
    out: dict = {}
    for v in values:
        key = "not stated" if v is None else (int(v) if float(v).is_integer() else v)
        out[key] = out.get(key, 0) + 1
    return out


def _not_loading(run: Run, path: Path, d: Described) -> dict:
    """What of the adapter this base would not take: modules that land nowhere, or the loader's refusal."""
    try:
        if d.format in ("diffusers", "kohya") and d.kind in ("lora", "dora"):
            layers, keys = apply_lora(run, d.path, "inspected")
            # layers are not modules (Flux's fused qkv lands as three): the file's modules less those named unplaced
            missed = {k.split(".lora")[0].removesuffix(".alpha") for k in keys}
            landed = len(d.modules) - len(missed) if layers else 0
            return {"modules": len(d.modules), "landed": landed, "keys": keys, "error": None}
        load_checkpoint(run, path, adapter_name="inspected")
        return {"modules": len(d.modules), "landed": len(d.modules), "keys": [], "error": None}
    except ConfigError as e:
        return {"modules": len(d.modules), "landed": 0, "keys": [], "error": str(e)}


def _inspect_text(report: dict) -> str:
    lines = [
        f"\n== {report['path']} ==",
        f"format       {report['format']} ({report['kind']})",
        f"family       {' or '.join(report['families']) or '-'}: {report['family_evidence']}",
        f"modules      {json.dumps(report['modules_per_component'])}",
        f"ranks        {json.dumps(report['ranks'])} (rank: modules)",
        f"alphas       {json.dumps(report['alphas'])}",
        f"triggers     {', '.join(report['triggers']) or '-'}",
        f"metadata     {len(report['metadata'])} keys: {', '.join(list(report['metadata'])[:12])}",
    ]
    n = report.get("not_loading")
    if n:
        if n["error"]:
            lines.append(f"on the base  does not load: {n['error']}")
        else:
            missing = n["modules"] - n["landed"]
            lines.append(
                f"on the base  {n['landed']} of {n['modules']} modules load"
                + (f"; not: {', '.join(n['keys'][:8])}" if missing else "")
            )
    return "\n".join(lines)


def _inspect_card(report: dict) -> str:
    lines = [f"# {Path(report['path']).name}", "", "What `python -m tuner recipe=inspect` read in it.", ""]
    lines += ["| | |", "|---|---|"]
    lines += [
        f"| format | {report['format']} ({report['kind']}) |",
        f"| family | {' or '.join(report['families']) or '-'} ({report['family_evidence']}) |",
        f"| modules | {', '.join(f'{k}: {v}' for k, v in report['modules_per_component'].items())} |",
        f"| ranks (rank: modules) | {', '.join(f'{k}: {v}' for k, v in report['ranks'].items())} |",
        f"| alphas | {', '.join(f'{k}: {v}' for k, v in report['alphas'].items())} |",
        f"| trigger words | {', '.join(report['triggers']) or '-'} |",
    ]
    n = report.get("not_loading")
    if n:
        said = n["error"] or f"{n['landed']} of {n['modules']} modules load" + (
            f"; not: {', '.join(n['keys'])}" if n["keys"] else ""
        )
        lines.append(f"| on `{Path(report['base']).name}` | {said} |")
        if not n["error"]:
            lines += ["", "The base without and with it, same prompts and seeds:", "", "![gallery](gallery/grid.png)"]
    lines += ["", "## Metadata", "", "| key | value |", "|---|---|"]
    lines += [f"| `{k}` | {str(v)[:200].replace('|', '/')} |" for k, v in report["metadata"].items()]
    return "\n".join(lines) + "\n"
