"""A run: one folder, the stages of one recipe, in order.

A recipe (``recipes/NAME.yaml``) lists its ``stages``; ``STAGES`` below names every stage it may list, in
the order a training recipe runs them. With several processes every rank runs the stages that need them
all; rank 0 alone runs the others.
"""

from __future__ import annotations

import json
import time

from omegaconf import DictConfig

from tuner import distributed, run_folder
from tuner.digits import base as digits_base
from tuner.digits import stages as digits
from tuner.files import write_atomic
from tuner.stages import adapters, base, data, evaluate, export, extract, gallery, generate, inspect, toolbox, train
from tuner.stages.context import Builtin, Exported, Run

STAGES = {
    fn.__name__: fn
    for fn in (
        base.base,
        digits.subject,  # the quickstart's synthetic subject
        data.prepare,
        data.class_images,
        train.train,
        adapters.load_adapter,
        toolbox.merge,  # the LoRA toolbox (recipes lora_merge, lora_extract, lora_resize, inspect)
        extract.extract,
        toolbox.resize,
        inspect.inspect,
        export.export,
        gallery.gallery,
        evaluate.evaluate,  # subject fidelity, drift, ... (the digits classifier, eval.clip, eval.dino)
        digits.evaluate_base,  # recipe=digits_base: the base's own per-digit score
        generate.generate,
    )
}

# the embedded bases ``model.builtin`` may name (model=digits): built once, cached under $TUNER_HOME
BUILTINS = {"digits": Builtin(digits_base.ensure, digits_base.check, digits.DigitJudge, digits.judged)}


def entries(cfg: DictConfig) -> tuple[str, ...]:
    """Every entry of the run folder that the stages of ``cfg`` may write (the manifest lists them)."""
    return tuple(sorted({name for s in cfg.stages if s in STAGES for name in STAGES[s].writes}))


def run_recipe(cfg: DictConfig) -> Run:
    """Run every stage of ``cfg.stages`` in order and print the summary.

    With several processes every rank runs the stages that need them all (base, data, class images,
    training); rank 0 alone runs the others (export, gallery, evaluate, generate). Once no stage
    left needs them, the other ranks are done and exit.
    """
    run = Run(cfg, entries(cfg), BUILTINS)
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
                run_stage(run, name)
            if i < last_shared:  # a later stage on every rank may read what this one wrote
                run.wait()
        else:
            run_stage(run, name)
        run.metrics.setdefault("seconds", {})[name] = round(time.time() - t, 1)
    if not run.is_main:
        return run
    run.metrics["seconds"]["total"] = round(time.time() - start, 1)
    summary = {"recipe": cfg.recipe, "run_dir": str(run.dir), "outputs": run.outputs, "metrics": run.metrics}
    if run.accelerator.num_processes > 1:
        summary["processes"] = run.accelerator.num_processes
    if Exported in run.results:
        summary["files"] = run.result(Exported).files
    write_atomic(run.dir / "summary.json", json.dumps(summary, indent=2))
    run_folder.finish(run.dir)
    print(format_summary(summary), flush=True)
    return run


def run_stage(run: Run, name: str) -> object:
    """Run one stage; its result (if any) is kept for the stages after it, by its type (``Run.result``)."""
    result = STAGES[name](run)
    if result is not None:
        run.results[type(result)] = result
    return result


def format_summary(summary: dict) -> str:
    lines = [f"\n== tuner {summary['recipe']}: done in {summary['metrics']['seconds']['total']} s =="]
    lines.append(f"run folder   {summary['run_dir']}")
    lines += [f"{name:<12} {path}" for name, path in summary["outputs"].items()]
    for name, value in summary["metrics"].items():
        if name == "validation":  # every number at every validation step: the page and summary.json hold them
            lines.append(f"{name:<12} {', '.join(value)} at {len(next(iter(value.values()), {}))} steps (summary.json)")
        elif name != "seconds":
            lines.append(f"{name:<12} {json.dumps(value)}")
    for path, entry in summary.get("files", {}).items():
        lines.append(f"{'file':<12} {path}  sha256 {entry['sha256'][:16]}  {entry['bytes']:,} bytes")
    return "\n".join(lines)
