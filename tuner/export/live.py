"""The adapters on a run's live model, as the LoRA toolbox's stages (tuner/stages/toolbox.py, extract.py,
inspect.py) work on them: their peft layers, one adapter's difference on a module, the result put back as one LoRA,
one adapter made the acting one; the gallery of base / inputs / result; the reports of what each module's cut kept.
And the samples of the base and of the fine-tuned model at the same seeds, which the gallery and evaluate stages
compare (``with_and_without_adapter``).

``run`` is the stage's ``tuner.stages.context.Run``, read through its attributes (this layer does not import the
stages).
"""

from __future__ import annotations

import json

import torch

from tuner.errors import ConfigError
from tuner.export.gallery import write_gallery
from tuner.export.lowrank import Cut, Factors
from tuner.export.tensors import install_lora, layer_factors, tuner_layers, unwrap
from tuner.files import write_atomic


def live_layers(run) -> dict[str, dict[str, list[torch.nn.Module]]]:
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


def install(run, results: dict[str, dict[str, Cut | Factors]]) -> None:
    """Take every loaded adapter out and put the result in, one LoRA named ``default``."""
    for component, module in run.components.trainable().items():
        unwrap(module)
        factors = {n: r.factors if isinstance(r, Cut) else r for n, r in results.get(component, {}).items()}
        install_lora(module, factors)
    run.replaced_modules()


def activate(run, adapter: str | None) -> None:
    """Make ``adapter`` the one that acts on every layer holding it (None: the base, every adapter off)."""
    for module in run.components.trainable().values():
        for layer in tuner_layers(module).values():
            layer.enable_adapters(adapter is not None)
            if adapter is not None:
                layer.set_adapter(adapter)


def _prompts(run, triggers: list[str]) -> list[str]:
    """The gallery's prompts: sample.prompts, else the instance and class prompts, else the inputs' triggers."""
    s, d = run.cfg.sample, run.cfg.data
    return list(s.prompts) or [p for p in (d.instance_prompt, d.class_prompt) if p] or triggers[:2]


class Gallery:
    """Rows of samples collected as a toolbox stage goes (base, inputs, result), written at the end."""

    def __init__(self, run, triggers: list[str]):
        self.run, self.prompts, self.rows = run, _prompts(run, triggers), []
        references = run.family.REFERENCES
        if self.prompts and references is not None and references.required:  # its pipeline draws no prompt alone
            print(f"[tuner] no gallery: model={run.cfg.model.family}'s pipeline only edits references", flush=True)
            self.prompts = []
        elif not self.prompts:
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


def report(run, name: str, summary: dict, modules: list[dict]) -> None:
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


def sample_pairs(run, pairs, seeds, steps, guidance, desc=None, pipe=None, refiner=None) -> list[torch.Tensor]:
    """An edit family's edits of ``pairs`` (``tuner.sampling.Pair``) at ``seeds`` with the run's model (or ``pipe``),
    at the base's sampler: one (len(seeds), 3, H, W) tensor per pair. (No refiner: SDXL's edits nothing.)"""
    from tuner import sampling

    return sampling.sample_edits(
        pipe or run.pipe, run.family.REFERENCES, pairs, seeds, run.cfg.data.resolution, steps=steps,
        guidance_scale=guidance, batch_size=run.cfg.sample.batch_size, desc=desc, autocast=run.accelerator.autocast,
        decode=run.family.decode, guidance=run.family.guidance_kwargs, **run.family.call_kwargs(),
    )  # fmt: skip


def validation_edits(run):
    """An edit family's validation (``tuner.training.monitor.Edits``): ``validation.pairs`` of the run's prepared
    pairs, the held-out ones first, edited by ``sample_pairs``; None for a family that reads no references."""
    from tuner.sampling import edit_pairs
    from tuner.training.monitor import Edits

    references = run.family.REFERENCES
    if references is None:
        return None

    def sample(pairs, seeds, steps, guidance, desc=None):
        return sample_pairs(run, pairs, seeds, steps, guidance, desc)

    return Edits(edit_pairs(run.dir, run.cfg, run.cfg.validation.pairs), sample, references.required)


def with_and_without_adapter(run, prompts, seeds, steps, guidance, desc, pairs=None):
    """Sample the same prompts and seeds from the base and from the fine-tuned model (each followed by
    ``sample.refiner``, an SDXL refiner, when set); with ``pairs``, an edit family's edits of them at ``seeds``
    instead (``sample_pairs``: one tensor per pair).

    With only peft adapters trained, the base is the same model with its adapters switched off; when
    base weights or the vocabulary changed, it is a fresh copy of the base, loaded for this and freed (with a
    refiner of its own: a refiner reads the prompt with the base's CLIP-G, new tokens and all).
    """
    c = run.components
    if pairs is not None:

        def draw(prompts, seeds, steps, guidance, desc, pipe=None, refiner=None):
            return sample_pairs(run, pairs, seeds, steps, guidance, desc, pipe)
    else:
        draw = run.sample
    adapted = [m for m in c.trainable().values() if getattr(m, "peft_config", None)]
    changed = run.adapted.base_weights_changed
    if not adapted and not changed:
        raise ConfigError("gallery/evaluate need an adapter: put train or load_adapter (checkpoint=PATH) before them")
    if changed:
        base = run.family.load(run.base, run.cfg.model.prediction_type, run.cfg.model.allow_pickle)
        base_pipe = run.family.pipeline(base)
        base_pipe.to(run.accelerator.device)
        base_images = draw(prompts, seeds, steps, guidance, f"{desc} (base)", base_pipe, run.load_refiner(base))
        del base_pipe
    refiner = run.load_refiner()
    if not changed:
        for module in adapted:
            module.disable_adapters()
        base_images = draw(prompts, seeds, steps, guidance, f"{desc} (base)", refiner=refiner)
        for module in adapted:
            module.enable_adapters()
    tuned_images = draw(prompts, seeds, steps, guidance, f"{desc} (fine-tuned)", refiner=refiner)
    return base_images, tuned_images
