"""A run: one folder, the stages of one recipe, in order.

A recipe (``recipes/NAME.yaml``) lists its ``stages``; ``tuner/stages/__init__.py`` names each. With several
processes every rank runs the stages that need them all; rank 0 alone runs the others.
"""

from __future__ import annotations

import json
import time

from omegaconf import DictConfig, OmegaConf

from tuner import run_folder
from tuner.files import write_atomic
from tuner.stages import STAGES, entries
from tuner.stages.context import Run


def run_recipe(cfg: DictConfig) -> Run:
    """Run every stage of ``cfg.stages`` in order and print the summary.

    With several processes every rank runs the stages that need them all (base, data, class images,
    training); rank 0 alone runs the others (export, gallery, evaluate, generate). Once no stage
    left needs them, the other ranks are done and exit.
    """
    from tuner import distributed

    run = Run(cfg, entries(cfg))
    start = time.time()
    stages = list(cfg.stages)
    last_shared = max((i for i, name in enumerate(stages) if not STAGES[name].main_only), default=-1)
    for i, name in enumerate(stages):
        if i > last_shared and run.accelerator.num_processes > 1:
            if not run.is_main:
                rest = ", ".join(stages[i:])
                print(f"[tuner] rank {run.accelerator.process_index}: done; rank 0 goes on with {rest}", flush=True)
                return run
            distributed.go_alone()  # what is left runs on rank 0 only: no collective may wait for the others
        t = time.time()
        if run.is_main:
            print(f"[tuner] stage {name}", flush=True)
        if STAGES[name].main_only:
            if run.is_main:
                STAGES[name](run)
            if i < last_shared:  # a later stage on every rank may read what this one wrote
                run.wait()
        else:
            STAGES[name](run)
        run.metrics.setdefault("seconds", {})[name] = round(time.time() - t, 1)
    if not run.is_main:
        return run
    run.metrics["seconds"]["total"] = round(time.time() - start, 1)
    write_atomic(run.dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))  # with what stages filled in
    summary = {"recipe": cfg.recipe, "run_dir": str(run.dir), "outputs": run.outputs, "metrics": run.metrics}
    if run.accelerator.num_processes > 1:
        summary["processes"] = run.accelerator.num_processes
    if run.files:
        summary["files"] = run.files
    write_atomic(run.dir / "summary.json", json.dumps(summary, indent=2))
    run_folder.finish(run.dir)
    print(format_summary(summary), flush=True)
    return run


def format_summary(summary: dict) -> str:
    lines = [f"\n== tuner {summary['recipe']}: done in {summary['metrics']['seconds']['total']} s =="]
    lines.append(f"run folder   {summary['run_dir']}")
    lines += [f"{name:<12} {path}" for name, path in summary["outputs"].items()]
    for name, value in summary["metrics"].items():
        if name != "seconds":
            lines.append(f"{name:<12} {json.dumps(value)}")
    for path, entry in summary.get("files", {}).items():
        lines.append(f"{'file':<12} {path}  sha256 {entry['sha256'][:16]}  {entry['bytes']:,} bytes")
    return "\n".join(lines)
