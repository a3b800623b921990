"""Run inside a ComfyUI checkout's own environment (never imports tuner): load a single-file checkpoint and
LoRA files with ComfyUI's own loading code and write what its patched models compute.

    python comfyui_check.py SPEC.json OUT.safetensors
    (SPEC: comfyui, checkpoint (null: no model, the embedding's tokens only), clips (ComfyUI's keys for the
    family's tokens, one per text encoder; null: no text encoder), clip_files (text encoders' own files, read by
    ComfyUI's CLIP loader, for a checkpoint that is a diffusion model alone: Flux, SD3), inputs (latents,
    timestep, context; y, the pooled conditioning, where the family has it; SDXL's text_embeds and time_ids;
    Flux's guidance), loras {name: file}, and optionally embedding {folder, name, tokenizer (ComfyUI's tokenizer
    class of the family, under comfy.), at})

OUT holds, for the base and each LoRA, the denoiser's output on the fixed inputs and the text conditioning
ComfyUI builds (its CLIPs' states, side by side: SDXL's penultimate CLIP-L and bigG); for an embedding, the
vectors ComfyUI's tokenizer read from it for each of its CLIPs ("embedding.<key>") and the text conditioning
with them in place of the fixed ids from ``at`` on ("ti.text"); OUT.json the family ComfyUI detected (with its
parent classes) and every log line about a key it did not load.
"""

import importlib
import json
import logging
import sys

spec, out_path = json.load(open(sys.argv[1])), sys.argv[2]
sys.path.insert(0, spec["comfyui"])
sys.argv = [sys.argv[0], "--cpu", "--force-fp32", "--fp32-text-enc"]  # ComfyUI reads its options from here

import comfy.options  # noqa: E402

comfy.options.enable_args_parsing()

import comfy.model_management  # noqa: E402
import comfy.sd  # noqa: E402
import comfy.utils  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

LEFT_OVER = ("lora key not loaded", "NOT LOADED", "unet missing", "clip missing", "missing", "unexpected")


class Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines = []

    def emit(self, record):
        message = record.getMessage()
        if any(message.startswith(p) or p in message[:40] for p in LEFT_OVER):
            self.lines.append(message[:20000])


collect = Collect()
logging.getLogger().addHandler(collect)
logging.getLogger().setLevel(logging.DEBUG)

inputs = load_file(spec["inputs"])
embedding = spec.get("embedding")
folder = embedding["folder"] if embedding else None
model = clip = None
if spec.get("checkpoint") and not spec.get("clip_files") and spec.get("clips"):  # a checkpoint: denoiser, CLIPs
    model, clip, _, _ = comfy.sd.load_checkpoint_guess_config(
        spec["checkpoint"], output_vae=False, output_clip=True, embedding_directory=folder
    )
elif spec.get("checkpoint"):  # a diffusion model's file alone (Flux, SD3): ComfyUI's Load Diffusion Model
    model = comfy.sd.load_diffusion_model(spec["checkpoint"])
if spec.get("clip_files"):  # ComfyUI's Load CLIP
    clip = comfy.sd.load_clip(spec["clip_files"], embedding_directory=folder)
config = type(model.model.model_config) if model is not None else None
report = {"family": config and config.__name__, "lineage": [c.__name__ for c in config.__mro__] if config else []}
report |= {"checkpoint": collect.lines, "loras": {}}
collect.lines = []


def conditioning(model):
    """What ComfyUI's sampler hands the denoiser besides the context: SDXL's added vector from its own
    ``encode_adm`` (pooled prompt, size and crop embeddings), or the pooled vector as given."""
    if "time_ids" not in inputs:
        return inputs.get("y")
    height, width, crop_h, crop_w, target_height, target_width = inputs["time_ids"][0].tolist()
    return model.model.encode_adm(
        pooled_output=inputs["text_embeds"], height=height, width=width, crop_h=crop_h, crop_w=crop_w,
        target_height=target_height, target_width=target_width,
    )  # fmt: skip


def fixed_tokens(vectors=None):
    """The fixed ids for each of ComfyUI's CLIPs; with ``vectors``, each CLIP's rows put in from ``at`` on."""
    tokens = {}
    for key in spec["clips"]:
        ids = [(int(i), 1.0) for i in inputs["ids"][0]]
        if vectors is not None:
            at, rows = embedding["at"], vectors[key]
            ids[at : at + len(rows)] = [(row, 1.0) for row in rows]
        tokens[key] = [ids]
    return tokens


def outputs(model, clip, tag):
    out = {}
    if model is not None:
        comfy.model_management.load_models_gpu([model])
        unet, extra = model.model.diffusion_model, {}
        if "guidance" in inputs:
            extra["guidance"] = inputs["guidance"]
        with torch.no_grad():
            out[f"{tag}.denoiser"] = unet(
                inputs["latents"], inputs["timestep"], context=inputs["context"], y=conditioning(model), **extra
            )
    if clip is not None:
        out[f"{tag}.text"] = clip.encode_from_tokens(fixed_tokens())
    return {k: v.float() for k, v in out.items()}


out = outputs(model, clip, "base")
if embedding:  # "embedding:<name>" in a prompt, as ComfyUI's CLIP Text Encode node reads it
    if clip is not None and not spec.get("clip_files"):  # the checkpoint's own tokenizer
        tokenizer = clip.tokenizer
    else:  # the family's, as its CLIP loader would make it (Flux's: CLIP-L and T5-XXL)
        module, cls = embedding["tokenizer"].rsplit(".", 1)
        tokenizer = getattr(importlib.import_module(f"comfy.{module}"), cls)(embedding_directory=folder)
    tokens = tokenizer.tokenize_with_weights(f"embedding:{embedding['name']}")
    report["embedding"] = {"lines": collect.lines, "clips": sorted(tokens)}
    collect.lines = []
    vectors = {}
    for key, batches in tokens.items():
        found = [t[0] for t in batches[0] if isinstance(t[0], torch.Tensor)]
        if found:
            vectors[key] = torch.stack([v.reshape(-1) for v in found])
            out[f"embedding.{key}"] = vectors[key]
    if clip is not None and spec.get("clips"):  # the fixed ids with each CLIP's vectors, through its CLIP
        out["ti.text"] = clip.encode_from_tokens(fixed_tokens(vectors)).float()
for name, path in spec["loras"].items():
    lora = comfy.utils.load_torch_file(path)
    patched, patched_clip = comfy.sd.load_lora_for_models(model, clip, lora, 1.0, 1.0)
    out |= outputs(patched, patched_clip, name)
    report["loras"][name] = {"keys": len(lora), "not_loaded": collect.lines}
    collect.lines = []
    comfy.model_management.unload_all_models()

save_file({k: v.contiguous() for k, v in out.items()}, out_path)
with open(out_path + ".json", "w") as f:
    json.dump(report, f, indent=2)
print(json.dumps(report, indent=2))
