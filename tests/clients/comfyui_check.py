"""Run inside a ComfyUI checkout's own environment (never imports tuner): load a single-file checkpoint and
LoRA files with ComfyUI's own loading code and write what its patched models compute.

    python comfyui_check.py SPEC.json OUT.safetensors
    (SPEC: comfyui, checkpoint (null: no model, the embedding's tokens only), clip (ComfyUI's key for the
    family's tokens; null: the file is a diffusion model alone), inputs (latents, timestep, context, and y, the
    pooled conditioning, where the family has it), loras {name: file}, and optionally embedding {folder, name,
    tokenizer (ComfyUI's tokenizer class of the family, under comfy.), at})

OUT holds, for the base and each LoRA, the denoiser's output on the fixed inputs and the text encoder's
last hidden states; for an embedding, the vectors ComfyUI's tokenizer read from it for each of its CLIPs
("embedding.<key>") and the text encoder's states with them in place of the fixed ids from ``at`` on
("ti.text"); OUT.json the family ComfyUI detected and every log line about a key it did not load.
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
if spec.get("checkpoint") and spec.get("clip"):  # a checkpoint: denoiser, text encoders (and VAE, not read here)
    model, clip, _, _ = comfy.sd.load_checkpoint_guess_config(
        spec["checkpoint"], output_vae=False, output_clip=True, embedding_directory=folder
    )
elif spec.get("checkpoint"):  # a diffusion model's file alone (Flux, SD3): ComfyUI's Load Diffusion Model
    model = comfy.sd.load_diffusion_model(spec["checkpoint"])
family = type(model.model.model_config).__name__ if model is not None else None
report = {"family": family, "checkpoint": collect.lines, "loras": {}}
collect.lines = []


def outputs(model, clip, tag):
    comfy.model_management.load_models_gpu([model])
    unet = model.model.diffusion_model
    with torch.no_grad():
        out = {
            f"{tag}.denoiser": unet(inputs["latents"], inputs["timestep"], context=inputs["context"], y=inputs.get("y"))
        }
    if clip is not None:
        tokens = {spec["clip"]: [[(int(i), 1.0) for i in inputs["ids"][0]]]}
        out[f"{tag}.text"] = clip.encode_from_tokens(tokens)
    return {k: v.float() for k, v in out.items()}


out = outputs(model, clip, "base") if model is not None else {}
if embedding:  # "embedding:<name>" in a prompt, as ComfyUI's CLIP Text Encode node reads it
    if clip is not None:
        tokenizer = clip.tokenizer
    else:
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
    if clip is not None:  # the fixed ids with the vectors in place from ``at`` on, through ComfyUI's CLIP
        at, rows = embedding["at"], vectors[spec["clip"]]
        ids = [(int(i), 1.0) for i in inputs["ids"][0]]
        ids[at : at + len(rows)] = [(row, 1.0) for row in rows]
        out["ti.text"] = clip.encode_from_tokens({spec["clip"]: [ids]}).float()
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
