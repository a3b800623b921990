"""Run inside an environment with InvokeAI installed (never imports tuner): identify LoRA files with
InvokeAI's own model probe, patch the base's denoiser and text encoder with its LoRA code, and write what
they compute; read a merged pipeline folder's text encoder with InvokeAI's pinned transformers.

    python invokeai_check.py SPEC.json OUT.safetensors   (SPEC: base, merged, inputs, loras {name: file})

The patching is what InvokeAI's denoise and prompt nodes do: LoRA layers from the file
(``lora_model_from_sd_state_dict``, SDXL keys converted first), applied with ``LayerPatcher`` under the
prefix each model takes, on models given InvokeAI's custom layers as its model cache gives them.
"""

import json
import logging
import sys

import torch
from diffusers import UNet2DConditionModel
from invokeai.backend.model_manager.configs.factory import ModelConfigFactory
from invokeai.backend.model_manager.load.model_cache.torch_module_autocast.torch_module_autocast import (
    apply_custom_layers_to_model,
)
from invokeai.backend.patches.layer_patcher import LayerPatcher
from invokeai.backend.patches.lora_conversions.sd_lora_conversion_utils import lora_model_from_sd_state_dict
from invokeai.backend.patches.lora_conversions.sdxl_lora_conversion_utils import convert_sdxl_keys_to_diffusers_format
from safetensors.torch import load_file, save_file
from transformers import CLIPTextModel

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

unet = UNet2DConditionModel.from_pretrained(spec["base"], subfolder="unet").eval()
text = CLIPTextModel.from_pretrained(spec["base"], subfolder="text_encoder").eval()
apply_custom_layers_to_model(unet)
apply_custom_layers_to_model(text)


def outputs():
    with torch.no_grad():
        denoised = unet(inputs["latents"], inputs["timestep"], encoder_hidden_states=inputs["context"]).sample
        return denoised, text(inputs["ids"]).last_hidden_state


out, report = {}, {"loras": {}}
out["base.denoiser"], out["base.text"] = outputs()
for name, path in spec["loras"].items():
    config = ModelConfigFactory.from_model_on_disk(path).config
    base = getattr(getattr(config, "base", None), "value", None)
    state = load_file(path)
    if base == "sdxl":
        state = convert_sdxl_keys_to_diffusers_format(state)
    lora = lora_model_from_sd_state_dict(state)
    prefixes = ("lora_unet_", "lora_te_")
    unmatched = [k for k in lora.layers if not k.startswith(prefixes)]
    with (
        LayerPatcher.apply_smart_model_patches(
            model=unet, patches=[(lora, 1.0)], prefix="lora_unet_", dtype=torch.float32
        ),
        LayerPatcher.apply_smart_model_patches(
            model=text, patches=[(lora, 1.0)], prefix="lora_te_", dtype=torch.float32
        ),
    ):
        out[f"{name}.denoiser"], out[f"{name}.text"] = outputs()
    report["loras"][name] = {
        "probe": {"type": getattr(getattr(config, "type", None), "value", None), "base": base},
        "layers": len(lora.layers),
        "not_loaded": unmatched + collect.lines,
    }
    collect.lines = []

if spec.get("merged"):
    merged = CLIPTextModel.from_pretrained(spec["merged"], subfolder="text_encoder").eval()
    with torch.no_grad():
        out["merged.text"] = merged(inputs["ids"]).last_hidden_state

save_file({k: v.float().contiguous() for k, v in out.items()}, out_path)
with open(out_path + ".json", "w") as f:
    json.dump(report, f, indent=2)
print(json.dumps(report, indent=2))
