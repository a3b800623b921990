"""The LoRA toolbox (rank 0): the merge and resize stages. What they share with extract.py and inspect.py is in
tuner/export/fitting.py (the inputs' checks) and tuner/export/live.py (the live adapters, the gallery of base /
inputs / result, the reports).

Each stage works on the base model's live modules: its inputs load onto the base as peft adapters (through the
same loaders as ``checkpoint=``, so every format tuner reads), the result is computed per module with the
arithmetic of tuner/export/lowrank.py and put back as one peft LoRA, and the export stage after it writes
that LoRA (or, merged into the base, the model) in every format of ``export.formats``, with the model card.
Each writes a report (``merge.json``, ``extract.json``, ``resize.json``, ``inspect.json``: every module's rank
and what its cut kept) and, where it has a prompt, a gallery: the base, the inputs, the result, same seeds.

    recipe=lora_merge    'merge.inputs=[{path: A, weight: 1.0}, {path: B, weight: 0.5}]' [merge.rank=R]
    recipe=lora_resize   checkpoint=A resize.rank=R | resize.energy=E
    recipe=lora_extract  model.path=BASE extract.tuned=TUNED extract.rank=R [extract.energy=0.9]   (extract.py)
    recipe=inspect       checkpoint=A [model.path=BASE]                                           (inspect.py)

Inputs are checked from their headers when the configuration is (tuner/export/inspection.py): a missing,
damaged or pickled file, one without LoRA keys, halves that do not pair, an unknown key style, or a LoRA
made for another family is refused by name before any model loads.
"""

from __future__ import annotations

from pathlib import Path

from tqdm.auto import tqdm

from tuner.errors import ConfigError
from tuner.export.fitting import check_formats, check_input
from tuner.export.inspection import describe
from tuner.export.live import Gallery, cut_lines, cut_row, cut_summary, difference, install, live_layers, report
from tuner.export.loading import load_checkpoint
from tuner.export.lowrank import Cut, Factors, cut_delta, cut_factors, stack
from tuner.export.tensors import tuner_layers, unwrap
from tuner.stages.context import Adapted, Made, Run, stage


def _check_merge(cfg) -> None:
    m = cfg.merge
    if not m.inputs:
        raise ConfigError(
            "merge.inputs is empty: 'merge.inputs=[{path: A.safetensors, weight: 1.0}, {path: B, weight: 0.5}]'"
        )
    described = [
        check_input(cfg, ref.path, f"merge.inputs[{i}]", ("lora", "loha", "lokr")) for i, ref in enumerate(m.inputs)
    ]
    for i, d in enumerate(described):
        if d.kind != "lora" and m.rank is None:
            raise ConfigError(
                f"merge.inputs[{i}]: {d.path} is a {d.kind}, whose products do not stack into a LoRA exactly; "
                "set merge.rank=R to cut the sum to a LoRA of rank R"
            )
    check_formats(cfg, {"base_weights"} if m.into_base else {"lora"})


def _check_resize(cfg) -> None:
    r = cfg.resize
    if r.rank is None and r.energy is None:
        raise ConfigError("resize: set resize.rank=R (e.g. 8) or resize.energy=E (e.g. 0.95), or both (E, at most R)")
    check_input(cfg, cfg.checkpoint, "checkpoint", ("lora", "loha", "lokr"))
    check_formats(cfg, {"lora"})


# ---------------------------------------------------------------- merge


@stage(main_only=True, after=("base",), writes=("gallery", "merge.json"), check=_check_merge)
def merge(run: Run) -> Adapted:
    """LoRAs added into one: exact by stacking their ranks, or cut to ``merge.rank`` per module."""
    m = run.cfg.merge
    tokens, triggers, names = [], [], []
    for i, ref in enumerate(m.inputs):
        path = Path(ref.path).expanduser()
        tokens += load_checkpoint(run, path, adapter_name=f"input_{i}").tokens
        triggers += describe(path).triggers
        names.append(path.name if path.is_file() else "/".join(path.parts[-2:]))
    gallery = Gallery(run, triggers)
    gallery.add("base")
    for i in range(len(m.inputs)):
        gallery.add(f"{names[i]}", f"input_{i}")
    results, rows = {}, []
    layers = live_layers(run)
    for component, by_name in layers.items():
        for name, nest in tqdm(by_name.items(), desc=f"merge {component}", leave=False):
            parts = [(difference(nest, f"input_{i}"), ref.weight) for i, ref in enumerate(m.inputs)]
            parts = [(d, w) for d, w in parts if d is not None]
            if all(isinstance(d, Factors) for d, _ in parts):
                stacked = stack(parts)
                result = stacked if m.rank is None else cut_factors(stacked, m.rank)
            else:  # a LoHa or LoKr among them: the sum of the differences, cut to merge.rank
                delta = sum(w * (d.delta() if isinstance(d, Factors) else d) for d, w in parts)
                result = cut_delta(delta, m.rank)
            results.setdefault(component, {})[name] = result
            if isinstance(result, Cut):
                rows.append(cut_row(component, name, result))
            else:
                rows.append({"module": f"{component}.{name}", "rank": result.rank})
    install(run, results)
    gallery.add("merged", "default")
    gallery.write()
    weights = ", ".join(f"{n} x {ref.weight:g}" for n, ref in zip(names, m.inputs))
    if not rows:
        raise ConfigError("merge: the inputs put no LoRA module on this base")
    summary = (
        cut_summary(rows)
        if m.rank is not None
        else {"modules": len(rows), "rank": {"max": max(r["rank"] for r in rows)}}
    )
    report(run, "merge", {"inputs": [{"path": r.path, "weight": r.weight} for r in m.inputs], **summary}, rows)
    if m.into_base:
        _fuse(run)
    how = f"cut to rank {m.rank} per module by its singular values" if m.rank else "exactly, their ranks stacked"
    lines = [f"Merged from {weights}, {how}.", "", *(cut_lines(summary) if m.rank else [])]
    if m.into_base:
        lines.append("The merged LoRA is fused into the base weights.")
    run.results[Made] = Made(
        f"merged by tuner from {len(m.inputs)} adapters", tuple(lines), tuple(dict.fromkeys(triggers)),
        "The base, each input alone, and the merge, same prompts and seeds:",
    )  # fmt: skip
    print(f"[tuner] merge: {len(rows)} modules ({how}); report {run.dir / 'merge.json'}", flush=True)
    return Adapted(None, tuple(tokens), base_weights_changed=m.into_base or bool(tokens), fused=m.into_base)


def _fuse(run: Run) -> None:
    """Fuse the ``default`` LoRA into the base weights (peft's merge) and take the layers out."""
    for module in run.components.trainable().values():
        for layer in tuner_layers(module).values():
            layer.merge(safe_merge=True, adapter_names=["default"])
            layer.merged_adapters.clear()  # fused for good: the base layer is the model now
        unwrap(module)
    run.replaced_modules()


# ---------------------------------------------------------------- resize


@stage(main_only=True, after=("base",), writes=("gallery", "resize.json"), check=_check_resize)
def resize(run: Run) -> Adapted:
    """A LoRA (``checkpoint=``) at a lower rank: each module's best approximation, by its singular values."""
    r = run.cfg.resize
    path = Path(run.cfg.checkpoint).expanduser()
    loaded = load_checkpoint(run, path, adapter_name="input")
    triggers = describe(path).triggers
    gallery = Gallery(run, triggers)
    gallery.add("base")
    gallery.add(path.name, "input")
    results, rows = {}, []
    for component, by_name in live_layers(run).items():
        for name, nest in tqdm(by_name.items(), desc=f"resize {component}", leave=False):
            found = difference(nest, "input")
            if found is None:
                continue
            if isinstance(found, Factors):
                cut = cut_factors(found, min(r.rank or found.rank, found.rank), r.energy)
            else:
                cut = cut_delta(found, r.rank, r.energy)
            results.setdefault(component, {})[name] = cut
            rows.append(cut_row(component, name, cut))
    install(run, results)
    gallery.add("resized", "default")
    gallery.write()
    summary = cut_summary(rows)
    report(run, "resize", summary, rows)
    asked = " and ".join(x for x in (f"rank {r.rank}" if r.rank else "", f"energy {r.energy}" if r.energy else "") if x)
    lines = [f"`{path.name}` resized ({asked}) by each module's singular values.", "", *cut_lines(summary)]
    run.results[Made] = Made(
        "resized by tuner",
        tuple(lines),
        tuple(triggers),
        "The base, the input LoRA, and the resized one, same prompts and seeds:",
    )
    print(f"[tuner] resize: {len(rows)} modules; kept energy per module in {run.dir / 'resize.json'}", flush=True)
    return Adapted(None, tuple(loaded.tokens), base_weights_changed=bool(loaded.tokens))
