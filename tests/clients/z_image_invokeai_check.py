"""Run inside an environment with InvokeAI installed (never imports tuner): Z-Image's files as InvokeAI 6.14 reads
them. Each LoRA file is probed by its model probe; those it calls Z-Image LoRAs are loaded by its ``LoRALoader``
(``lora_model_from_z_image_state_dict``) and patched into diffusers' ``ZImageTransformer2DModel`` (the class
InvokeAI runs Z-Image with) by ``LayerPatcher`` under the prefix its Z-Image denoise node uses; the single file is
probed and read by its Z-Image checkpoint loader, which builds the transformer from Z-Image's config written in
(30 layers, two refiners of each kind) and reads it strictly: here it builds it at the test base's depth, the rest
of that config kept.

    python z_image_invokeai_check.py SPEC.json OUT      (SPEC: base, expected, loras {name: file}, single_file)

Writes OUT.json: per file, its probe and, where it loads, each weight's largest difference from ``expected``
(peft's merge of the run's adapter), what it left over, and how many weights it changed.
"""

import json
import logging
import sys

import torch
from diffusers import ZImageTransformer2DModel
from invokeai.backend.model_manager.configs.factory import ModelConfigFactory
from invokeai.backend.model_manager.load.model_cache.torch_module_autocast.torch_module_autocast import (
    apply_custom_layers_to_model,
)
from invokeai.backend.model_manager.load.model_loaders import z_image as loaders
from invokeai.backend.model_manager.load.model_loaders.lora import LoRALoader
from invokeai.backend.patches.layer_patcher import LayerPatcher
from invokeai.backend.patches.lora_conversions.z_image_lora_constants import Z_IMAGE_LORA_TRANSFORMER_PREFIX
from safetensors.torch import load_file

spec, out_path = json.load(open(sys.argv[1])), sys.argv[2]
warned = []
logging.getLogger(LayerPatcher.__name__).addHandler(
    type("Collect", (logging.Handler,), {"emit": lambda self, r: warned.append(r.getMessage()[:300])})(logging.WARNING)
)


def probe(path):
    try:
        config = ModelConfigFactory.from_model_on_disk(path).config
    except Exception as e:  # noqa: BLE001 - what InvokeAI says of a file it does not take
        return None, {"type": None, "base": None, "error": f"{type(e).__name__}: {str(e)[:200]}"}
    return config, {k: getattr(getattr(config, k, None), "value", None) for k in ("type", "base")}


expected = load_file(spec["expected"])
transformer = ZImageTransformer2DModel.from_pretrained(spec["base"]).eval()
apply_custom_layers_to_model(transformer)
base = {k: v.detach().clone() for k, v in transformer.state_dict().items()}


def compare(state):
    shared = [k for k in expected if k in state]

    def cast(t, k):
        return t.to(state[k].dtype).float()

    return {
        "max_diff": max(float((state[k].float() - cast(expected[k], k)).abs().max()) for k in shared),
        "missing": sorted(set(expected) - set(state)),
        "changed": sum(not torch.equal(state[k].float(), cast(base[k], k)) for k in shared),
    }


report = {"loras": {}}
for name, path in spec["loras"].items():
    config, kind = probe(path)
    entry = {"probe": kind}
    if kind["type"] == "lora" and kind["base"] == "z-image":
        loader = LoRALoader.__new__(LoRALoader)  # its _load_model reads no more of the app than these
        loader._model_base, loader._torch_dtype = config.base, torch.float32
        patch = loader._load_model(config)
        unmatched = []
        for key in patch.layers:
            try:
                transformer.get_submodule(key.removeprefix(Z_IMAGE_LORA_TRANSFORMER_PREFIX))
            except AttributeError:
                unmatched.append(key)
        with LayerPatcher.apply_smart_model_patches(
            model=transformer, patches=[(patch, 1.0)], prefix=Z_IMAGE_LORA_TRANSFORMER_PREFIX, dtype=torch.float32,
            force_direct_patching=True,
        ):  # fmt: skip
            entry |= compare({k: v.detach() for k, v in transformer.state_dict().items()})
        modules = {k.rsplit(".", 2)[0] for k in load_file(path)}
        entry |= {"modules": len(modules), "layers": len(patch.layers), "not_loaded": unmatched + warned}
        warned.clear()
        restored = transformer.state_dict()
        assert all(torch.equal(restored[k], v) for k, v in base.items()), "the patcher left the weights changed"
    report["loras"][name] = entry

config, kind = probe(spec["single_file"])
report["single_file"] = {"probe": kind}
if kind["type"] == "main" and kind["base"] == "z-image":
    loader = loaders.ZImageCheckpointModel.__new__(loaders.ZImageCheckpointModel)
    loader._ram_cache = type("Room", (), {"make_room": lambda self, size: None})()  # no model cache here
    given, strict = {}, loaders.load_state_dict_ignoring_extras

    def recording(model, state_dict, *args, **kwargs):  # what the loader hands the class, before it drops extras
        given.update(state_dict)
        return strict(model, state_dict, *args, **kwargs)

    import diffusers

    depth = {k: transformer.config[k] for k in ("n_layers", "n_refiner_layers")}

    def at_the_bases_depth(**config):  # the loader's `from diffusers import ZImageTransformer2DModel`
        return ZImageTransformer2DModel(**{**config, **depth})

    loaders.load_state_dict_ignoring_extras, diffusers.ZImageTransformer2DModel = recording, at_the_bases_depth
    try:
        model = loader._load_from_singlefile(config)
    finally:
        loaders.load_state_dict_ignoring_extras, diffusers.ZImageTransformer2DModel = strict, ZImageTransformer2DModel
    state = model.state_dict()
    report["single_file"] |= {
        "dropped": sorted(set(given) - set(state)),
        "unloaded": sorted(k for k, v in state.items() if v.is_meta),
        "added": sorted(set(state) - set(expected)),
        **compare({k: state[k] for k in expected if k in state}),
    }  # fmt: skip
with open(out_path + ".json", "w") as f:
    json.dump(report, f, indent=2)
print(json.dumps(report, indent=2))
