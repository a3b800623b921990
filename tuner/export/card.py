"""The model card: ``README.md`` in the run folder, in the Hugging Face model-card shape (YAML front matter)."""

from __future__ import annotations

import json
from pathlib import Path

from tuner.export.formats import usage
from tuner.files import write_atomic


def _selected(selected: dict | None) -> str | None:
    """Which step's weights were exported and why (checkpoints.select, export.from, train.early_stop)."""
    if not selected:
        return None
    return f"step {selected['step']} of {selected['of']}: {selected['why']}"


def _settings_table(info: dict) -> str:
    rows = [
        ("adapter", info.get("adapter_type")),
        ("rank / alpha", f"{info['rank']} / {info['alpha']}" if info.get("rank") else None),
        ("text encoder", info.get("text_encoder")),
        ("new tokens", ", ".join(info["tokens"]) if info.get("tokens") else None),
        ("resolution", info.get("resolution")),
        ("steps", info.get("steps")),
        ("weights of", _selected(info.get("selected"))),
        ("batch size", info.get("batch_size")),
        ("learning rate", info.get("learning_rate")),
        (
            "optimizer / schedule",
            f"{info.get('optimizer')} / {info.get('lr_scheduler')}" if info.get("optimizer") else None,
        ),
        ("mixed precision", info.get("mixed_precision")),
        ("seed", info.get("seed")),
        ("training images", info.get("num_images")),
        ("class images", info.get("num_class_images")),
    ]
    lines = ["| setting | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in rows if v not in (None, "")]
    return "\n".join(lines)


def write_model_card(path: Path, info: dict, files: dict, cfg, family) -> Path:
    """Write the card: front matter, what was trained on which base, the gallery, how to load, settings, files."""
    base = info.get("base_name") or "BASE_MODEL"
    tags = ["text-to-image", "stable-diffusion", "diffusers", "tuner"]
    if info.get("adapter"):
        tags.append({"lora": "lora", "dora": "dora", "loha": "lycoris", "lokr": "lycoris"}[info["adapter"]])
    if info.get("tokens"):
        tags.append("textual-inversion")
    front = {"library_name": "diffusers", "base_model": base, "tags": tags}
    if info.get("instance_prompt"):
        front["instance_prompt"] = info["instance_prompt"]
    lines = ["---"] + [f"{k}: {json.dumps(v)}" for k, v in front.items()] + ["---", "", f"# {info['name']}", ""]
    what = {
        "lora": "A LoRA",
        "dora": "A DoRA adapter",
        "loha": "A LoHa adapter",
        "lokr": "A LoKr adapter",
        None: "A fine-tune" if info.get("steps") else "A checkpoint",
    }[info.get("adapter")]
    lines.append(
        f"{what} for `{base}` ({family.MODELSPEC_ARCHITECTURE}), {info.get('description') or 'exported by tuner'}."
    )
    lines.append("")
    if info.get("trigger"):
        lines += [f"Trigger: `{info['trigger']}`", ""]
    if "gallery" in cfg.stages or (path.parent / "gallery" / "grid.png").exists():
        lines += [
            "## Samples",
            "",
            info.get("gallery") or "Base model and fine-tuned, same prompts and seeds:",
            "",
            "![gallery](gallery/grid.png)",
            "",
        ]
    lines += ["## How to use", "", usage(files, base, family, info.get("trigger") or "your prompt")]
    if info.get("made"):
        lines += ["## How it was made", "", *info["made"], ""]
    if info.get("steps"):
        lines += ["## Training", "", _settings_table(info), ""]
    lines += ["## Files", "", "| file | bytes | sha256 |", "|---|---|---|"]
    lines += [f"| `{name}` | {e['bytes']:,} | `{e['sha256']}` |" for name, e in files.items()]
    lines.append("")
    return write_atomic(path, "\n".join(lines))
