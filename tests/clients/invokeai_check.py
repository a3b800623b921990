"""Run inside an environment with InvokeAI installed (never imports tuner): identify LoRA files with
InvokeAI's own model probe, patch the base's denoiser and text encoders with its LoRA code, and write what
they compute; read a merged pipeline folder's text encoders with InvokeAI's pinned transformers.

    python invokeai_check.py SPEC.json OUT.safetensors
    (SPEC: base, merged, inputs, loras {name: file}, text_encoders {folder: [class, LoRA key prefix]}, and
    optionally embedding {file, at})

The patching is what InvokeAI's denoise and prompt nodes do: LoRA layers from the file
(``lora_model_from_sd_state_dict``, SDXL keys converted first), applied with ``LayerPatcher`` under the
prefix each model takes, on models given InvokeAI's custom layers as its model cache gives them. An embedding
is read by ``TextualInversionModelRaw`` and put into each text encoder and its tokenizer by
``ModelPatcher.apply_ti``, as its prompt node does; its trigger's ids (with the pad tokens InvokeAI expands it
to) replace the fixed ids from ``at`` on.
"""

import contextlib
import json
import logging
import sys

import torch
import transformers
from diffusers import UNet2DConditionModel
from invokeai.backend.model_manager.configs.factory import ModelConfigFactory
from invokeai.backend.model_manager.load.model_cache.torch_module_autocast.torch_module_autocast import (
    apply_custom_layers_to_model,
)
from invokeai.backend.model_patcher import ModelPatcher
from invokeai.backend.patches.layer_patcher import LayerPatcher
from invokeai.backend.patches.lora_conversions.sd_lora_conversion_utils import lora_model_from_sd_state_dict
from invokeai.backend.patches.lora_conversions.sdxl_lora_conversion_utils import convert_sdxl_keys_to_diffusers_format
from invokeai.backend.textual_inversion import TextualInversionModelRaw
from safetensors.torch import load_file, save_file

spec, out_path = json.load(open(sys.argv[1])), sys.argv[2]
inputs = load_file(spec["inputs"])


class Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage()[:300])


collect = Collect()
logging.getLogger(LayerPatcher.__name__).addHandler(collect)


def text_encoders(folder):
    return {
        name: getattr(transformers, cls).from_pretrained(folder, subfolder=name).eval()
        for name, (cls, _) in spec["text_encoders"].items()
    }


unet = UNet2DConditionModel.from_pretrained(spec["base"], subfolder="unet").eval()
texts = text_encoders(spec["base"])
for model in (unet, *texts.values()):
    apply_custom_layers_to_model(model)
added = {k: inputs[k] for k in ("text_embeds", "time_ids") if k in inputs}  # SDXL's added conditioning


def outputs(tag):
    with torch.no_grad():
        kwargs = {"added_cond_kwargs": added} if added else {}
        out = {f"{tag}.denoiser": unet(inputs["latents"], inputs["timestep"], inputs["context"], **kwargs).sample}
        for name, text in texts.items():
            out[f"{tag}.{name}"] = text(inputs["ids"]).last_hidden_state
    return out


out, report = outputs("base"), {"loras": {}}
for name, path in spec["loras"].items():
    config = ModelConfigFactory.from_model_on_disk(path).config
    base = getattr(getattr(config, "base", None), "value", None)
    state = load_file(path)
    if base == "sdxl":
        state = convert_sdxl_keys_to_diffusers_format(state)
    lora = lora_model_from_sd_state_dict(state)
    prefixes = {"lora_unet_": unet, **{p: texts[n] for n, (_, p) in spec["text_encoders"].items()}}
    with contextlib.ExitStack() as patched:
        for prefix, model in prefixes.items():
            patch = LayerPatcher.apply_smart_model_patches(
                model=model, patches=[(lora, 1.0)], prefix=prefix, dtype=torch.float32
            )
            patched.enter_context(patch)
        out |= outputs(name)
    report["loras"][name] = {
        "probe": {"type": getattr(getattr(config, "type", None), "value", None), "base": base},
        "layers": len(lora.layers),
        "not_loaded": [k for k in lora.layers if not k.startswith(tuple(prefixes))] + collect.lines,
    }
    collect.lines = []

if spec.get("embedding"):
    path, at = spec["embedding"]["file"], spec["embedding"]["at"]
    config = ModelConfigFactory.from_model_on_disk(path).config
    probe = {k: getattr(getattr(config, k, None), "value", None) for k in ("type", "base")}
    ti, rows = TextualInversionModelRaw.from_checkpoint(path), {}
    for name, text in texts.items():
        tokenizer = transformers.CLIPTokenizer.from_pretrained(
            spec["base"], subfolder=name.replace("text_encoder", "tokenizer")
        )
        with ModelPatcher.apply_ti(tokenizer, text, [("sks", ti)]) as (ti_tokenizer, manager):
            first = ti_tokenizer.convert_tokens_to_ids("<sks>")
            trigger = [first, *manager.pad_tokens.get(first, [])]
            ids = inputs["ids"].clone()
            ids[0, at : at + len(trigger)] = torch.tensor(trigger)
            with torch.no_grad():
                out[f"ti.{name}"] = text(ids).last_hidden_state
        rows[name] = len(trigger)
    report["embedding"] = {"probe": probe, "vectors": rows}

if spec.get("merged"):
    with torch.no_grad():
        for name, text in text_encoders(spec["merged"]).items():
            out[f"merged.{name}"] = text(inputs["ids"]).last_hidden_state

save_file({k: v.float().contiguous() for k, v in out.items()}, out_path)
with open(out_path + ".json", "w") as f:
    json.dump(report, f, indent=2)
print(json.dumps(report, indent=2))
