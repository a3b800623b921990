"""The LoRA toolbox's stages (rank 0): merge LoRAs, extract one from a fine-tuned model, resize one, inspect one.

Each works on the base model's live modules: its inputs load onto the base as peft adapters (through the
same loaders as ``checkpoint=``, so every format tuner reads), the result is computed per module with the
arithmetic of tuner/export/lowrank.py and put back as one peft LoRA, and the export stage after it writes
that LoRA (or, merged into the base, the model) in every format of ``export.formats``, with the model card.
Each writes a report (``merge.json``, ``extract.json``, ``resize.json``, ``inspect.json``: every module's rank
and what its cut kept) and, where it has a prompt, a gallery: the base, the inputs, the result, same seeds.

    recipe=lora_merge    'merge.inputs=[{path: A, weight: 1.0}, {path: B, weight: 0.5}]' [merge.rank=R]
    recipe=lora_extract  model.path=BASE extract.tuned=TUNED extract.rank=R [extract.energy=0.9]
    recipe=lora_resize   checkpoint=A resize.rank=R | resize.energy=E
    recipe=inspect       checkpoint=A [model.path=BASE]

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
from tuner.export.inspection import Described, describe
from tuner.export.lowrank import Cut, Factors, cut_delta, cut_factors, stack
from tuner.export.reading import check_header
from tuner.export.tensors import install_lora, layer_factors, tuner_layers, unwrap
from tuner.files import write_atomic
from tuner.models import get_family
from tuner.stages.adapters import apply_lora, load_checkpoint
from tuner.stages.context import Adapted, Base, Made, Run, stage

# ---------------------------------------------------------------- checks (from the inputs' headers)


def _check_input(cfg, path: str, key: str, kinds=("lora", "loha", "lokr")) -> Described:
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
    family = cfg.model.family
    if family not in described.families:
        made_for = " or ".join(described.families)
        raise ConfigError(
            f"{key}: {described.path} is a LoRA for {made_for} ({described.evidence}), but model.family={family}; "
            f"pass model={described.families[0]} with that family's model.path"
        )
    return described


def _a(kind: str) -> str:
    return {"embedding": "an embedding (textual inversion)", "dora": "a DoRA adapter"}.get(kind, f"a {kind}")


def _check_formats(cfg, parts: set[str]) -> None:
    if cfg.export.formats is not None and "export" in cfg.stages:
        formats.check_held(parts, list(cfg.export.formats), get_family(cfg.model.family, cfg.model))


def _check_merge(cfg) -> None:
    m = cfg.merge
    if not m.inputs:
        raise ConfigError(
            "merge.inputs is empty: 'merge.inputs=[{path: A.safetensors, weight: 1.0}, {path: B, weight: 0.5}]'"
        )
    described = [
        _check_input(cfg, ref.path, f"merge.inputs[{i}]", ("lora", "loha", "lokr")) for i, ref in enumerate(m.inputs)
    ]
    for i, d in enumerate(described):
        if d.kind != "lora" and m.rank is None:
            raise ConfigError(
                f"merge.inputs[{i}]: {d.path} is a {d.kind}, whose products do not stack into a LoRA exactly; "
                "set merge.rank=R to cut the sum to a LoRA of rank R"
            )
    _check_formats(cfg, {"base_weights"} if m.into_base else {"lora"})


def _check_extract(cfg) -> None:
    e = cfg.extract
    if not e.tuned:
        raise ConfigError(
            "extract.tuned is not set: pass the fine-tuned model (a diffusers folder or a .safetensors file)"
        )
    tuned = Path(e.tuned).expanduser()
    if not tuned.exists():
        raise ConfigError(f"extract.tuned={e.tuned}: no such file or folder")
    family = get_family(cfg.model.family, cfg.model)
    try:
        if tuned.is_dir():
            family.check_folder(tuned, cfg.model.allow_pickle)
        else:
            check_header(tuned, "a fine-tuned model")
    except ConfigError as e:
        raise ConfigError(f"extract.tuned: {e}") from None
    base = Path(cfg.model.path or "").expanduser()
    if tuned.is_dir() and base.is_dir():  # the two denoisers' shapes, from their configs
        mine, theirs = (json.loads((f / family.DENOISER / "config.json").read_text()) for f in (base, tuned))
        differ = [k for k in SHAPE_KEYS if k in mine and mine.get(k) != theirs.get(k)]
        if differ:
            k = differ[0]
            raise ConfigError(
                f"extract.tuned={e.tuned}: its {family.DENOISER} has {k}={theirs.get(k)}, the base's (model.path) "
                f"{mine[k]}; a fine-tune of another model cannot be compared with this base"
            )
    _check_formats(cfg, {"lora"})


# a denoiser config's keys that decide its weights' shapes (U-Nets' and transformers')
SHAPE_KEYS = (
    "block_out_channels", "cross_attention_dim", "in_channels", "layers_per_block", "transformer_layers_per_block",
    "attention_head_dim", "num_attention_heads", "num_layers", "num_single_layers", "joint_attention_dim",
    "caption_projection_dim", "pooled_projection_dim", "down_block_types", "addition_embed_type",
    "use_linear_projection",
)  # fmt: skip


def _check_resize(cfg) -> None:
    r = cfg.resize
    if r.rank is None and r.energy is None:
        raise ConfigError("resize: set resize.rank=R (e.g. 8) or resize.energy=E (e.g. 0.95), or both (E, at most R)")
    _check_input(cfg, cfg.checkpoint, "checkpoint", ("lora", "loha", "lokr"))
    _check_formats(cfg, {"lora"})


def _check_inspect(cfg) -> None:
    if not cfg.checkpoint:
        raise ConfigError("checkpoint= is not set: pass the adapter to inspect (a file, an export or a run folder)")
    try:
        describe(Path(cfg.checkpoint))
    except ConfigError as e:
        raise ConfigError(f"checkpoint: {e}") from None


# ---------------------------------------------------------------- the live adapters


def _layers(run: Run) -> dict[str, dict[str, list[torch.nn.Module]]]:
    """The peft layers on the base, by component, then the name of the module they sit on (peft layers of
    different kinds on one module nest, a LoHa's base layer being a LoRA layer: all of them)."""
    out = {}
    for component, module in run.components.trainable().items():
        by_module: dict[str, list] = {}
        for name, layer in tuner_layers(module).items():
            by_module.setdefault(name.replace(".base_layer", ""), []).append(layer)
        out[component] = by_module
    return out


def _difference(layers: list, adapter: str) -> Factors | torch.Tensor | None:
    """One adapter's difference on one module: its factors (a LoRA), else the whole difference (LoHa, LoKr)."""
    for layer in layers:
        factors = layer_factors(layer, adapter)
        if factors is not None:
            return factors
        if any(adapter in getattr(layer, n, {}) for n in layer.adapter_layer_names):
            return layer.get_delta_weight(adapter).detach().float()
    return None


def _install(run: Run, results: dict[str, dict[str, Cut | Factors]]) -> None:
    """Take every loaded adapter out and put the result in, one LoRA named ``default``."""
    for component, module in run.components.trainable().items():
        unwrap(module)
        factors = {n: r.factors if isinstance(r, Cut) else r for n, r in results.get(component, {}).items()}
        install_lora(module, factors)
    run.replaced_modules()


def _activate(run: Run, adapter: str | None) -> None:
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
            _activate(self.run, adapter)
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


def _report(run: Run, name: str, summary: dict, modules: list[dict]) -> None:
    """``RUN/<name>.json``: the summary and every module's row; the summary goes to summary.json too."""
    run.metrics[name] = summary
    path = write_atomic(run.dir / f"{name}.json", json.dumps({**summary, "modules": modules}, indent=2))
    run.outputs[name] = str(path)


def _cut_row(component: str, name: str, cut: Cut) -> dict:
    return {
        "module": f"{component}.{name}",
        "rank_before": cut.rank_before,
        "rank": cut.factors.rank,
        "energy": round(cut.energy, 6),
        "relative_error": round(cut.error / cut.norm, 6) if cut.norm else 0.0,
    }


def _cut_summary(rows: list[dict]) -> dict:
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


def _cut_lines(summary: dict) -> list[str]:
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
    layers = _layers(run)
    for component, by_name in layers.items():
        for name, nest in tqdm(by_name.items(), desc=f"merge {component}", leave=False):
            parts = [(_difference(nest, f"input_{i}"), ref.weight) for i, ref in enumerate(m.inputs)]
            parts = [(d, w) for d, w in parts if d is not None]
            if all(isinstance(d, Factors) for d, _ in parts):
                stacked = stack(parts)
                result = stacked if m.rank is None else cut_factors(stacked, m.rank)
            else:  # a LoHa or LoKr among them: the sum of the differences, cut to merge.rank
                delta = sum(w * (d.delta() if isinstance(d, Factors) else d) for d, w in parts)
                result = cut_delta(delta, m.rank)
            results.setdefault(component, {})[name] = result
            if isinstance(result, Cut):
                rows.append(_cut_row(component, name, result))
            else:
                rows.append({"module": f"{component}.{name}", "rank": result.rank})
    _install(run, results)
    gallery.add("merged", "default")
    gallery.write()
    weights = ", ".join(f"{n} x {ref.weight:g}" for n, ref in zip(names, m.inputs))
    if not rows:
        raise ConfigError("merge: the inputs put no LoRA module on this base")
    summary = (
        _cut_summary(rows)
        if m.rank is not None
        else {"modules": len(rows), "rank": {"max": max(r["rank"] for r in rows)}}
    )
    _report(run, "merge", {"inputs": [{"path": r.path, "weight": r.weight} for r in m.inputs], **summary}, rows)
    if m.into_base:
        _fuse(run)
    how = f"cut to rank {m.rank} per module by its singular values" if m.rank else "exactly, their ranks stacked"
    lines = [f"Merged from {weights}, {how}.", "", *(_cut_lines(summary) if m.rank else [])]
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


# ---------------------------------------------------------------- extract


def extract_targets(family, targets: str, module: torch.nn.Module, denoiser: bool) -> list[str]:
    """The modules a LoRA may go into: a denoiser's by ``targets`` (the adapter presets: attn, attn_ff,
    all_linear, locon), every linear layer of a text encoder."""
    import re

    if not denoiser:
        return [n for n, m in module.named_modules() if isinstance(m, torch.nn.Linear)]
    exclude = re.compile(family.TARGETS_EXCLUDE) if family.TARGETS_EXCLUDE else None
    if targets in family.TARGETS:
        suffixes = tuple(family.TARGETS[targets])
        names = [n for n, _ in module.named_modules() if n in suffixes or n.endswith(tuple("." + s for s in suffixes))]
    else:
        kinds = (torch.nn.Linear,) if targets == "all_linear" else (torch.nn.Linear, torch.nn.Conv2d)
        names = [n for n, m in module.named_modules() if n.startswith(family.BLOCKS) and isinstance(m, kinds)]
    return [n for n in names if not (exclude and exclude.fullmatch(n))]


def _tuned_folder(run: Run) -> Path:
    from tuner.stages.base import single_file_folder

    tuned = Path(run.cfg.extract.tuned).expanduser()
    return single_file_folder(run, tuned, run.base, "tuned") if tuned.is_file() else tuned


@stage(main_only=True, after=("base",), writes=("gallery", "extract.json"), check=_check_extract)
def extract(run: Run) -> Adapted:
    """A LoRA approximating ``extract.tuned`` minus the base, per module by truncated SVD."""
    e, c = run.cfg.extract, run.components
    tuned = run.family.load(_tuned_folder(run), run.cfg.model.prediction_type, run.cfg.model.allow_pickle)
    gallery = Gallery(run, [])
    gallery.add("base")
    tuned_modules = tuned.trainable()
    results, rows, skipped, unheld = {}, [], [], []
    device = run.accelerator.device
    for component, module in c.trainable().items():
        other = tuned_modules[component]
        if component != c.denoiser_name and (not e.text_encoders or component not in run.family.LORA_TEXT_ENCODERS):
            why = (
                "extract.text_encoders=false" if not e.text_encoders else f"model={run.family.NAME} puts no LoRA in it"
            )
            unheld += _changed_elsewhere(component, module, other, set(), why)
            continue
        targets = extract_targets(run.family, e.targets, module, component == c.denoiser_name)
        held = set()
        for name in tqdm(targets, desc=f"extract {component}", leave=False):
            base_w = module.get_submodule(name).weight
            tuned_w = other.get_submodule(name).weight
            if tuned_w.shape != base_w.shape:
                raise ConfigError(
                    f"extract.tuned: {component}.{name} has shape {tuple(tuned_w.shape)}, the base's "
                    f"{tuple(base_w.shape)}; is it a fine-tune of another model?"
                )
            held.add(f"{name}.weight")
            delta = tuned_w.detach().to(device, torch.float32) - base_w.detach().to(device, torch.float32)
            change = float(delta.norm()) / max(float(base_w.float().norm()), 1e-12)
            if change <= e.threshold:
                if change > 0:
                    skipped.append({"module": f"{component}.{name}", "relative_change": change})
                continue
            conv = delta.dim() == 4
            cut = cut_delta(delta, e.conv_rank or e.rank if conv else e.rank, e.energy)
            cut.factors = Factors(cut.factors.down.cpu(), cut.factors.up.cpu())
            results.setdefault(component, {})[name] = cut
            rows.append(_cut_row(component, name, cut) | {"relative_change": round(change, 6)})
        unheld += _changed_elsewhere(component, module, other, held, f"outside extract.targets={e.targets}")
    unheld += _changed_elsewhere("vae", c.vae, tuned.vae, set(), "the VAE takes no LoRA")
    if gallery.prompts:  # the tuned model's row, the base's modules making room in host memory meanwhile
        for module in c.modules().values():
            module.to("cpu")
        pipe = run.family.pipeline(tuned).to(device)
        gallery.add("tuned", pipe=pipe)
        pipe.to("cpu")
        del pipe
        for module in c.modules().values():
            module.to(device)
    del tuned, tuned_modules
    if not results:
        raise ConfigError(
            f"extract: no module of extract.tuned={e.tuned} differs from the base by more than extract.threshold="
            f"{e.threshold} of its norm; is it the base itself?"
        )
    _install(run, results)
    gallery.add("extracted", "default")
    gallery.write()
    summary = _cut_summary(rows) | {"skipped": len(skipped), "changed_but_not_held": len(unheld)}
    _report(run, "extract", summary, rows + [{**s, "skipped": "below extract.threshold"} for s in skipped] + unheld)
    how = f"rank {e.rank}" + (f", convolutions {e.conv_rank}" if e.conv_rank else "")
    how += f", or the fewest singular values keeping {e.energy} of each module's squared norm" if e.energy else ""
    lines = [
        f"Extracted from `{Path(e.tuned).name}` minus its base, per module by truncated SVD ({how}).",
        "",
        *_cut_lines(summary),
        "",
        f"{len(skipped)} modules changed by less than {e.threshold} of their norm were left out; "
        f"{len(unheld)} changed tensors are not in it: outside extract.targets, or what no LoRA holds (biases, "
        "norms, embeddings, the VAE); extract.json lists both, each with why.",
    ]
    run.results[Made] = Made(
        "extracted by tuner from a fine-tuned model",
        tuple(lines),
        (),
        "The base, the fine-tuned model, and the extracted LoRA, same prompts and seeds:",
    )
    print(
        f"[tuner] extract: {len(rows)} modules, {len(skipped)} below the threshold, {len(unheld)} changed tensors "
        f"not in the LoRA; report {run.dir / 'extract.json'}",
        flush=True,
    )
    return Adapted(None, ())


def _changed_elsewhere(component: str, base, tuned, held: set[str], outside: str) -> list[dict]:
    """Tensors of ``tuned`` that differ from ``base`` and that no extracted module holds, each with why: a linear
    or convolution weight ``outside`` what was extracted, or a tensor no LoRA holds (a bias, a norm, an embedding)."""
    out = []
    theirs = tuned.state_dict()
    lowrank = {f"{n}.weight" for n, m in base.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
    for key, value in base.state_dict().items():
        if key in held or key not in theirs or theirs[key].shape != value.shape:
            continue
        if not torch.equal(theirs[key].to(value.device, value.dtype), value):
            why = outside if key in lowrank else "a LoRA holds only linear and convolution weights"
            out.append({"tensor": f"{component}.{key}", "not_held": why})
    return out


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
    for component, by_name in _layers(run).items():
        for name, nest in tqdm(by_name.items(), desc=f"resize {component}", leave=False):
            found = _difference(nest, "input")
            if found is None:
                continue
            if isinstance(found, Factors):
                cut = cut_factors(found, min(r.rank or found.rank, found.rank), r.energy)
            else:
                cut = cut_delta(found, r.rank, r.energy)
            results.setdefault(component, {})[name] = cut
            rows.append(_cut_row(component, name, cut))
    _install(run, results)
    gallery.add("resized", "default")
    gallery.write()
    summary = _cut_summary(rows)
    _report(run, "resize", summary, rows)
    asked = " and ".join(x for x in (f"rank {r.rank}" if r.rank else "", f"energy {r.energy}" if r.energy else "") if x)
    lines = [f"`{path.name}` resized ({asked}) by each module's singular values.", "", *_cut_lines(summary)]
    run.results[Made] = Made(
        "resized by tuner",
        tuple(lines),
        tuple(triggers),
        "The base, the input LoRA, and the resized one, same prompts and seeds:",
    )
    print(f"[tuner] resize: {len(rows)} modules; kept energy per module in {run.dir / 'resize.json'}", flush=True)
    return Adapted(None, tuple(loaded.tokens), base_weights_changed=bool(loaded.tokens))


# ---------------------------------------------------------------- inspect


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
        from tuner.stages.base import base as base_stage

        run.results[Base] = base_stage(run)
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
