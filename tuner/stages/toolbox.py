"""The LoRA toolbox (rank 0): the merge and resize stages, and what they share with extract.py and inspect.py
(the inputs' checks, the live adapters, the gallery of base / inputs / result, the reports).

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

import json
from pathlib import Path

import torch
from tqdm.auto import tqdm

from tuner.errors import ConfigError
from tuner.export import formats
from tuner.export.gallery import write_gallery
from tuner.export.inspection import Described, describe, misfit
from tuner.export.loading import load_checkpoint
from tuner.export.lowrank import Cut, Factors, cut_delta, cut_factors, stack
from tuner.export.tensors import install_lora, layer_factors, tuner_layers, unwrap
from tuner.files import write_atomic
from tuner.models import get_family
from tuner.stages.context import Adapted, Made, Run, stage

# ---------------------------------------------------------------- checks (from the inputs' headers)


def check_input(cfg, path: str, key: str, kinds=("lora", "loha", "lokr")) -> Described:
    """An input read from its header: an adapter of an allowed kind, for ``model.family``.

    Raises:
        ConfigError: naming ``key``, the file and what is wrong.
    """
    if not path:
        raise ConfigError(f"{key} is not set: pass a LoRA file, an export folder or a tuner run folder")
    try:
        described = describe(Path(path))
    except ConfigError as e:
        raise ConfigError(f"{key}: {e}") from None
    if described.kind not in kinds:
        raise ConfigError(f"{key}: {described.path} is {_a(described.kind)}, not {' / '.join(kinds)}")
    if described.format == "kohya" and described.kind in ("loha", "lokr"):
        raise ConfigError(
            f"{key}: {described.path} is a {described.kind} in kohya / LyCORIS keys, which diffusers cannot load; "
            "give the run's peft/ folder instead"
        )
    check_fit(cfg, described, key)
    return described


def check_adapter(cfg, path: str, key: str) -> None:
    """A generate adapter, from its header where ``describe`` reads it: a LoRA, LoHa or LoKr must fit the base
    (``check_fit``); an embedding is checked against the encoders when it loads, and what ``describe`` cannot
    read (a folder of several files, which loads whole) is left to the loader, which names what is wrong."""
    try:
        described = describe(Path(path))
    except ConfigError:
        return
    if described.kind != "embedding":
        check_fit(cfg, described, key)


def check_fit(cfg, described: Described, key: str) -> None:
    """An adapter against the base (``model.*``): a key style diffusers reads for this family, every module the
    base's folder names of the base's shape (from the headers of both: ``misfit``), names and widths of this
    family.

    Raises:
        ConfigError: naming ``key``, the file and the first thing that does not fit.
    """
    family = cfg.model.family
    if described.format == "kohya" and not get_family(family).DIFFUSERS_READS_KOHYA:
        raise ConfigError(
            f"{key}: {described.path} is a model={family} LoRA in kohya's keys, which diffusers cannot load (ComfyUI "
            "reads them); give the run's diffusers/ or peft/ export, or a diffusers-format file"
        )
    base = Path(cfg.model.path).expanduser() if cfg.model.path else None
    why = misfit(described, base, get_family(family, cfg.model).DENOISER) if base and base.is_dir() else None
    if why:
        raise ConfigError(
            f"{key}: {described.path} does not fit model.path={cfg.model.path}: {why}; a LoRA for another model "
            f"(family or size){f' ({described.evidence})' if described.evidence else ''}"
        )
    if family not in described.families:
        made_for = " or ".join(described.families)
        raise ConfigError(
            f"{key}: {described.path} is a LoRA for {made_for} ({described.evidence}), but model.family={family}; "
            f"pass model={described.families[0]} with that family's model.path"
        )


def _a(kind: str) -> str:
    return {"embedding": "an embedding (textual inversion)", "dora": "a DoRA adapter"}.get(kind, f"a {kind}")


def check_formats(cfg, parts: set[str]) -> None:
    if cfg.export.formats is not None and "export" in cfg.stages:
        formats.check_held(parts, list(cfg.export.formats), get_family(cfg.model.family, cfg.model))


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


# ---------------------------------------------------------------- the live adapters


def live_layers(run: Run) -> dict[str, dict[str, list[torch.nn.Module]]]:
    """The peft layers on the base, by component, then the name of the module they sit on (peft layers of
    different kinds on one module nest, a LoHa's base layer being a LoRA layer: all of them)."""
    out = {}
    for component, module in run.components.trainable().items():
        by_module: dict[str, list] = {}
        for name, layer in tuner_layers(module).items():
            by_module.setdefault(name.replace(".base_layer", ""), []).append(layer)
        out[component] = by_module
    return out


def difference(layers: list, adapter: str) -> Factors | torch.Tensor | None:
    """One adapter's difference on one module: its factors (a LoRA), else the whole difference (LoHa, LoKr)."""
    for layer in layers:
        factors = layer_factors(layer, adapter)
        if factors is not None:
            return factors
        if any(adapter in getattr(layer, n, {}) for n in layer.adapter_layer_names):
            return layer.get_delta_weight(adapter).detach().float()
    return None


def install(run: Run, results: dict[str, dict[str, Cut | Factors]]) -> None:
    """Take every loaded adapter out and put the result in, one LoRA named ``default``."""
    for component, module in run.components.trainable().items():
        unwrap(module)
        factors = {n: r.factors if isinstance(r, Cut) else r for n, r in results.get(component, {}).items()}
        install_lora(module, factors)
    run.replaced_modules()


def activate(run: Run, adapter: str | None) -> None:
    """Make ``adapter`` the one that acts on every layer holding it (None: the base, every adapter off)."""
    for module in run.components.trainable().values():
        for layer in tuner_layers(module).values():
            layer.enable_adapters(adapter is not None)
            if adapter is not None:
                layer.set_adapter(adapter)


def _prompts(run: Run, triggers: list[str]) -> list[str]:
    """The gallery's prompts: sample.prompts, else the instance and class prompts, else the inputs' triggers."""
    s, d = run.cfg.sample, run.cfg.data
    return list(s.prompts) or [p for p in (d.instance_prompt, d.class_prompt) if p] or triggers[:2]


class Gallery:
    """Rows of samples collected as a toolbox stage goes (base, inputs, result), written at the end."""

    def __init__(self, run: Run, triggers: list[str]):
        self.run, self.prompts, self.rows = run, _prompts(run, triggers), []
        if not self.prompts:
            print('[tuner] no gallery: no prompt (set sample.prompts=["a photo of ..."])', flush=True)

    def add(self, label: str, adapter: str | None = None, pipe=None) -> None:
        """Samples of every prompt at ``sample.seeds``, with ``adapter`` acting (or ``pipe``'s own modules)."""
        if not self.prompts:
            return
        s = self.run.cfg.sample
        if pipe is None:
            activate(self.run, adapter)
        seeds = list(s.seeds)
        every = [p for p in self.prompts for _ in seeds]
        images = self.run.sample(
            every, seeds * len(self.prompts), s.steps, s.guidance_scale, f"gallery ({label})", pipe
        )
        for k, prompt in enumerate(self.prompts):
            self.rows.append((k, f"{label}: {prompt}", images[k * len(seeds) : (k + 1) * len(seeds)]))

    def write(self) -> None:
        if not self.rows:
            return
        rows = [(label, images) for _, label, images in sorted(self.rows, key=lambda r: r[0])]
        s = self.run.cfg.sample
        self.run.outputs["gallery"] = str(write_gallery(self.run.dir / "gallery", rows, list(s.seeds), s.display_size))


def report(run: Run, name: str, summary: dict, modules: list[dict]) -> None:
    """``RUN/<name>.json``: the summary and every module's row; the summary goes to summary.json too."""
    run.metrics[name] = summary
    path = write_atomic(run.dir / f"{name}.json", json.dumps({**summary, "modules": modules}, indent=2))
    run.outputs[name] = str(path)


def cut_row(component: str, name: str, cut: Cut) -> dict:
    return {
        "module": f"{component}.{name}",
        "rank_before": cut.rank_before,
        "rank": cut.factors.rank,
        "energy": round(cut.energy, 6),
        "relative_error": round(cut.error / cut.norm, 6) if cut.norm else 0.0,
    }


def cut_summary(rows: list[dict]) -> dict:
    if not rows:
        return {"modules": 0}
    energies = [r["energy"] for r in rows]
    ranks = [r["rank"] for r in rows]
    return {
        "modules": len(rows),
        "rank": {"min": min(ranks), "max": max(ranks)},
        "energy": {"min": min(energies), "mean": round(sum(energies) / len(energies), 6)},
        "worst_relative_error": max(r["relative_error"] for r in rows),
    }


def cut_lines(summary: dict) -> list[str]:
    if not summary.get("modules"):
        return []
    r, e = summary["rank"], summary["energy"]
    ranks = f"{r['min']}" if r["min"] == r["max"] else f"{r['min']} to {r['max']}"
    return [
        f"{summary['modules']} modules at rank {ranks}; each keeps {e['min']:.4f} or more of its difference's squared "
        f"norm (mean {e['mean']:.4f}); the largest relative error is {summary['worst_relative_error']:.2e}."
    ]


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
