"""The model card: ``README.md`` in the run folder, in the Hugging Face model-card shape (YAML front matter)."""

from __future__ import annotations

import json
from pathlib import Path

from tuner.files import write_atomic


def _settings_table(info: dict) -> str:
    rows = [
        ("adapter", info.get("adapter_type")),
        ("rank / alpha", f"{info['rank']} / {info['alpha']}" if info.get("rank") else None),
        ("text encoder", info.get("text_encoder")),
        ("new tokens", ", ".join(info["tokens"]) if info.get("tokens") else None),
        ("resolution", info.get("resolution")),
        ("steps", info.get("steps")),
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


def _usage(info: dict, files: dict, base: str, pipeline: str = "StableDiffusionPipeline") -> str:
    """How to load each export that was written, in diffusers and in A1111 / ComfyUI."""
    names = set(files)
    trigger = info.get("trigger") or "your prompt"
    out = []
    if any(n.startswith("diffusers/") for n in names):
        lines = [
            "```python",
            f"from diffusers import {pipeline}",
            "",
            f'pipe = {pipeline}.from_pretrained("{base}")',
        ]
        if "diffusers/pytorch_lora_weights.safetensors" in names:
            lines.append('pipe.load_lora_weights("diffusers", weight_name="pytorch_lora_weights.safetensors")')
        for n in sorted(n for n in names if n.startswith("diffusers/embeddings/")):
            lines.append(f'pipe.load_textual_inversion("{n}")')
        lines += [f'image = pipe("{trigger}").images[0]', "```"]
        out += ["### diffusers", "", *lines, ""]
    kohya = sorted(n for n in names if n.startswith("kohya/") and n.count("/") == 1)
    embeddings = sorted(n for n in names if n.startswith("kohya/embeddings/"))
    if kohya or embeddings:
        out += ["### A1111 / Forge / ComfyUI", ""]
        for n in kohya:
            stem = Path(n).stem
            out.append(f"Copy `{n}` into `models/Lora` and add `<lora:{stem}:1>` to the prompt (A1111), or load it")
            out.append("with a LoraLoader node (ComfyUI).")
        for n in embeddings:
            out.append(f"Copy `{n}` into `embeddings/` and write `{Path(n).stem}` in the prompt.")
        out.append("")
    peft = sorted({n.split("/")[1] for n in names if n.startswith("peft/")})
    if peft:
        lines = [f'pipe.{c} = PeftModel.from_pretrained(pipe.{c}, "peft/{c}")' for c in peft]
        out += [
            "### PEFT",
            "",
            "```python",
            f"from diffusers import {pipeline}",
            "from peft import PeftModel",
            "",
        ]
        out += [f'pipe = {pipeline}.from_pretrained("{base}")', *lines, "```", ""]
    if any(n.startswith("merged/") for n in names):
        out += [
            "### Merged pipeline",
            "",
            "```python",
            f'pipe = {pipeline}.from_pretrained("merged")  # or variant="fp16", torch_dtype=torch.float16',
            "```",
            "",
        ]
    single = sorted(n for n in names if n.startswith("single_file/"))
    for n in single:
        out += [
            "### Single-file checkpoint",
            "",
            f"`{n}` goes into A1111's `models/Stable-diffusion` or ComfyUI's `models/checkpoints`; in diffusers:",
            "",
            "```python",
            f'pipe = {pipeline}.from_single_file("{n}", config="{base}", local_files_only=True)',
            "```",
            "",
        ]
    return "\n".join(out)


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
            "Base model and fine-tuned, same prompts and seeds:",
            "",
            "![gallery](gallery/grid.png)",
            "",
        ]
    lines += ["## How to use", "", _usage(info, files, base, family.PIPELINE)]
    if info.get("steps"):
        lines += ["## Training", "", _settings_table(info), ""]
    lines += ["## Files", "", "| file | bytes | sha256 |", "|---|---|---|"]
    lines += [f"| `{name}` | {e['bytes']:,} | `{e['sha256']}` |" for name, e in files.items()]
    lines.append("")
    return write_atomic(path, "\n".join(lines))
