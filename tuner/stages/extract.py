"""The extract stage (rank 0, recipe=lora_extract): a LoRA approximating a fine-tuned model minus its base.

``extract.tuned`` (a diffusers folder, or a single file read with the base's configs) and the base load whole;
each module ``extract.targets`` names (and the text encoders' linear layers) gives its difference, cut by
truncated SVD (tuner/export/lowrank.py) to ``extract.rank`` or by ``extract.energy``; the cuts become one LoRA
on the base (tuner/export/live.py), which the export stage writes. ``extract.json`` lists every module's
rank and kept energy, the modules skipped below ``extract.threshold``, and each changed tensor the LoRA does
not hold, with why.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tqdm.auto import tqdm

from tuner.base_model import single_file_folder
from tuner.errors import ConfigError
from tuner.export.fitting import check_formats
from tuner.export.live import Gallery, cut_lines, cut_row, cut_summary, install, report
from tuner.export.lowrank import Factors, cut_delta
from tuner.export.reading import check_header
from tuner.models import get_family
from tuner.models.checks import refuse_a_part
from tuner.stages.context import Adapted, Made, Run, stage


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
    refuse_a_part("extract.tuned", e.tuned, family)
    try:
        if tuned.is_dir():
            family.check_folder(tuned, cfg.model.allow_pickle)
        else:
            check_header(tuned, "a fine-tuned model")
    except ConfigError as error:  # the folder's checks speak of model.path: here it is extract.tuned
        said = str(error)
        said = said.replace(f"model.path={tuned}", f"extract.tuned={e.tuned}", 1)
        raise ConfigError(said if said.startswith("extract.tuned") else f"extract.tuned: {said}") from None
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
    check_formats(cfg, {"lora"})


# a denoiser config's keys that decide its weights' shapes (U-Nets' and transformers')
SHAPE_KEYS = (
    "block_out_channels", "cross_attention_dim", "in_channels", "layers_per_block", "transformer_layers_per_block",
    "attention_head_dim", "num_attention_heads", "num_layers", "num_single_layers", "joint_attention_dim",
    "caption_projection_dim", "pooled_projection_dim", "down_block_types", "addition_embed_type",
    "use_linear_projection",
)  # fmt: skip


def extract_targets(family, targets: str, module: torch.nn.Module, denoiser: bool) -> list[str]:
    """The modules a LoRA may go into, by full name: a denoiser's of the adapter preset ``targets`` (attn, attn_ff,
    all_linear, locon: the training's own ``denoiser_target_modules``, less the family's ``TARGETS_EXCLUDE``),
    every linear layer of a text encoder."""
    import re
    from types import SimpleNamespace

    from tuner.training.trainables import denoiser_target_modules

    if not denoiser:
        return [n for n, m in module.named_modules() if isinstance(m, torch.nn.Linear)]
    wanted = denoiser_target_modules(module, SimpleNamespace(target_modules=[], targets=targets), family)
    ends = tuple("." + n for n in wanted)  # a preset names modules by their last parts, as peft matches them
    names = [n for n, _ in module.named_modules() if n in set(wanted) or n.endswith(ends)]
    exclude = re.compile(family.TARGETS_EXCLUDE) if family.TARGETS_EXCLUDE else None
    return [n for n in names if not (exclude and exclude.fullmatch(n))]


def _tuned_folder(run: Run) -> Path:
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
            rows.append(cut_row(component, name, cut) | {"relative_change": round(change, 6)})
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
    install(run, results)
    gallery.add("extracted", "default")
    gallery.write()
    summary = cut_summary(rows) | {"skipped": len(skipped), "changed_but_not_held": len(unheld)}
    report(run, "extract", summary, rows + [{**s, "skipped": "below extract.threshold"} for s in skipped] + unheld)
    how = f"rank {e.rank}" + (f", convolutions {e.conv_rank}" if e.conv_rank else "")
    how += f", or the fewest singular values keeping {e.energy} of each module's squared norm" if e.energy else ""
    lines = [
        f"Extracted from `{Path(e.tuned).name}` minus its base, per module by truncated SVD ({how}).",
        "",
        *cut_lines(summary),
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
