"""Run inside an environment with InvokeAI installed (never imports tuner): identify LoRA files with
InvokeAI's own model probe, patch the base's denoiser and text encoders with its LoRA code, and write what
they compute; read a merged pipeline folder's text encoders with InvokeAI's pinned transformers.

    python invokeai_check.py SPEC.json OUT.safetensors
    (SPEC: base, merged, inputs, loras {name: file}, text_encoders {folder: [class, LoRA key prefix]}, and
    optionally embedding {file, at}; or, for Flux, inputs and flux {single_file, lora, clip (CLIP-L's folder)};
    or, for a diffusers-layout transformer family, transformer {class, base (its folder), expected (the merged
    weights), loras {name: file}, not_taken {name: file} (probed only), single_file})

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
inputs = load_file(spec["inputs"]) if spec.get("inputs") else {}


class Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage()[:300])


collect = Collect()
logging.getLogger(LayerPatcher.__name__).addHandler(collect)


def probe(path) -> dict:
    """What InvokeAI's model probe calls a file: its type and base."""
    config = ModelConfigFactory.from_model_on_disk(path).config
    return {k: getattr(getattr(config, k, None), "value", None) for k in ("type", "base")}


def check_flux(flux):
    """Flux, as InvokeAI's own transformer class (its BFL layout) at the test base's depth: the single file
    read strictly into it, the kohya LoRA converted by InvokeAI and patched into it and into CLIP-L; writes the
    patched transformer's weights (to compare with the run's trained single file) and CLIP-L's states."""
    from invokeai.backend.flux.model import Flux, FluxParams
    from invokeai.backend.patches.lora_conversions.flux_kohya_lora_conversion_utils import (
        lora_model_from_flux_kohya_state_dict,
    )
    from invokeai.backend.patches.lora_conversions.flux_lora_constants import (
        FLUX_LORA_CLIP_PREFIX,
        FLUX_LORA_TRANSFORMER_PREFIX,
    )

    state = load_file(flux["single_file"])
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("double_blocks."))
    single = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("single_blocks."))
    transformer = Flux(
        FluxParams(
            in_channels=64, vec_in_dim=768, context_in_dim=4096, hidden_size=3072, mlp_ratio=4.0, num_heads=24,
            depth=depth, depth_single_blocks=single, axes_dim=[16, 56, 56], theta=10_000, qkv_bias=True,
            guidance_embed=True,
        )
    )  # fmt: skip
    transformer.load_state_dict(state, strict=True)  # every key of the file, and nothing else, as InvokeAI's loader
    clip = transformers.CLIPTextModel.from_pretrained(flux["clip"]).eval()
    lora = lora_model_from_flux_kohya_state_dict(load_file(flux["lora"]))
    out = {}
    with contextlib.ExitStack() as patched:
        for prefix, model in ((FLUX_LORA_TRANSFORMER_PREFIX, transformer), (FLUX_LORA_CLIP_PREFIX, clip)):
            patched.enter_context(
                LayerPatcher.apply_smart_model_patches(
                    model=model, patches=[(lora, 1.0)], prefix=prefix, dtype=torch.float32, force_direct_patching=True
                )
            )
        out |= {f"transformer.{k}": v.detach().clone() for k, v in transformer.state_dict().items()}
        with torch.no_grad():
            out["lora.text"] = clip(inputs["ids"]).last_hidden_state
    prefixes = (FLUX_LORA_TRANSFORMER_PREFIX, FLUX_LORA_CLIP_PREFIX)
    report = {"probe": probe(flux["lora"]), "layers": len(lora.layers)}
    report["not_loaded"] = [k for k in lora.layers if not k.startswith(prefixes)] + collect.lines
    save_file({k: v.float().contiguous() for k, v in out.items()}, out_path)
    with open(out_path + ".json", "w") as f:
        json.dump(report, f, indent=2)
    print(json.dumps(report, indent=2))
    sys.exit(0)


def check_transformer(t):
    """A diffusers-layout transformer family (FLUX.2, Qwen-Image, Z-Image), as InvokeAI runs it: its diffusers class
    read from the base folder; each LoRA file probed, loaded by InvokeAI's ``LoRALoader`` (the routing of its probed
    base and format), handed on as the family's denoise node hands it on (FLUX.2's converts BFL names to
    diffusers' and splits fused q, k, v) and patched into the transformer under the node's prefix; and a
    single file read by its checkpoint loader. Reports, per file, each patched or loaded weight's largest
    difference from ``expected`` (the merged transformer's weights), and what was left over."""
    import diffusers
    from invokeai.backend.model_manager.load.model_loaders import flux, z_image
    from invokeai.backend.model_manager.load.model_loaders import qwen_image as qwen
    from invokeai.backend.model_manager.load.model_loaders.lora import LoRALoader
    from invokeai.backend.patches.lora_conversions.flux_bfl_peft_lora_conversion_utils import (
        convert_bfl_lora_patch_to_diffusers,
    )
    from invokeai.backend.patches.lora_conversions.flux_lora_constants import FLUX_LORA_TRANSFORMER_PREFIX
    from invokeai.backend.patches.lora_conversions.qwen_image_lora_constants import (
        QWEN_IMAGE_EDIT_LORA_TRANSFORMER_PREFIX,
    )
    from invokeai.backend.patches.lora_conversions.z_image_lora_constants import Z_IMAGE_LORA_TRANSFORMER_PREFIX

    # what each base's denoise node does with a loaded LoRA (flux2_denoise's _lora_iterator converts BFL-named
    # layers to diffusers' names; qwen_image_denoise's passes it on as loaded), the prefix it patches under, and
    # the loader of its single-file checkpoints
    nodes = {
        "flux2": (convert_bfl_lora_patch_to_diffusers, FLUX_LORA_TRANSFORMER_PREFIX, flux.Flux2CheckpointModel),
        "qwen-image": (lambda patch: patch, QWEN_IMAGE_EDIT_LORA_TRANSFORMER_PREFIX, qwen.QwenImageCheckpointModel),
        "z-image": (lambda patch: patch, Z_IMAGE_LORA_TRANSFORMER_PREFIX, z_image.ZImageCheckpointModel),
    }
    cls = getattr(diffusers, t["class"])
    expected = load_file(t["expected"])
    transformer = cls.from_pretrained(t["base"]).eval()
    apply_custom_layers_to_model(transformer)
    base = {k: v.detach().clone() for k, v in transformer.state_dict().items()}

    def compare(state):
        """The largest difference of ``state`` from ``expected`` (cast to its dtype), the keys it lacks or adds, and
        how many of its weights differ from the base's."""
        shared = [k for k in expected if k in state]

        def cast(t, k):
            return t.to(state[k].dtype).float()

        return {
            "max_diff": max(float((state[k].float() - cast(expected[k], k)).abs().max()) for k in shared),
            "missing": sorted(set(expected) - set(state)),
            "extra": sorted(set(state) - set(expected)),
            "changed": sum(not torch.equal(state[k].float(), cast(base[k], k)) for k in shared),
        }

    report = {"loras": {}, "not_taken": {}}
    for name, path in t.get("not_taken", {}).items():  # files InvokeAI is not meant to take: what its probe says
        try:
            config = ModelConfigFactory.from_model_on_disk(path).config
            report["not_taken"][name] = {k: getattr(getattr(config, k, None), "value", None) for k in ("type", "base")}
        except Exception as e:  # noqa: BLE001 - what InvokeAI says of a file it does not take
            report["not_taken"][name] = {"type": None, "base": None, "error": f"{type(e).__name__}: {str(e)[:200]}"}
    for name, path in t["loras"].items():
        config = ModelConfigFactory.from_model_on_disk(path).config
        kind = {k: getattr(getattr(config, k, None), "value", None) for k in ("type", "base")}
        loader = LoRALoader.__new__(LoRALoader)  # its _load_model reads no more of the app than these
        loader._model_base, loader._torch_dtype = config.base, torch.float32
        hand_on, prefix, _ = nodes[kind["base"]]
        patch = hand_on(loader._load_model(config))
        unmatched = []
        for key in patch.layers:
            try:
                transformer.get_submodule(key.removeprefix(prefix))
            except AttributeError:
                unmatched.append(key)
        with LayerPatcher.apply_smart_model_patches(
            model=transformer, patches=[(patch, 1.0)], prefix=prefix, dtype=torch.float32, force_direct_patching=True
        ):
            result = compare({k: v.detach() for k, v in transformer.state_dict().items()})
        modules = {
            key.split(".")[0] if key.startswith("lora_unet_") else key.rsplit(".", 2)[0] for key in load_file(path)
        }
        report["loras"][name] = {
            "probe": kind, "format": getattr(config.format, "value", None), "modules": len(modules),
            "layers": len(patch.layers), "not_loaded": unmatched + collect.lines, **result,
        }  # fmt: skip
        collect.lines = []
        restored = transformer.state_dict()
        assert all(torch.equal(restored[k], v) for k, v in base.items()), "the patcher left the weights changed"
    if t.get("single_file"):
        config = ModelConfigFactory.from_model_on_disk(t["single_file"]).config
        kind = {k: getattr(getattr(config, k, None), "value", None) for k in ("type", "base")}
        loader_cls = nodes[kind["base"]][2]
        loader = loader_cls.__new__(loader_cls)
        loader._ram_cache = type("Room", (), {"make_room": lambda self, size: None})()  # no model cache here
        given = {}
        module = sys.modules[loader_cls.__module__]
        strict = module.load_state_dict_ignoring_extras  # it drops keys the class lacks: record what it was given

        def recording(model, state_dict, *args, **kwargs):
            given.update(state_dict)
            return strict(model, state_dict, *args, **kwargs)

        # a loader that writes the family's real depth in (Z-Image's 30 layers) builds the class at the base's
        # depth here, the rest of its config kept; for a loader that reads the depth from the file, the same
        depth = {k: v for k, v in transformer.config.items() if "layers" in k}

        class AtTheBasesDepth(cls):
            def __new__(klass, *args, **config):
                return cls(*args, **{**config, **depth})

        module.load_state_dict_ignoring_extras = recording
        setattr(diffusers, t["class"], AtTheBasesDepth)  # what the loaders' `from diffusers import ...` finds
        try:
            model = loader._load_from_singlefile(config)
        finally:
            module.load_state_dict_ignoring_extras = strict
            setattr(diffusers, t["class"], cls)
        state = model.state_dict()
        report["single_file"] = {
            "probe": kind, "dropped": sorted(set(given) - set(state)),
            "unloaded": sorted(k for k, v in state.items() if v.is_meta),
            "added": sorted(set(state) - set(expected)), "dtype": str(next(iter(state.values())).dtype),
            **compare({k: state[k] for k in expected if k in state}),
        }  # fmt: skip
    with open(out_path + ".json", "w") as f:
        json.dump(report, f, indent=2)
    print(json.dumps(report, indent=2))
    sys.exit(0)


if spec.get("flux"):
    check_flux(spec["flux"])
if spec.get("transformer"):
    check_transformer(spec["transformer"])


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
    kind = probe(path)
    base = kind["base"]
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
        "probe": kind,
        "layers": len(lora.layers),
        "not_loaded": [k for k in lora.layers if not k.startswith(tuple(prefixes))] + collect.lines,
    }
    collect.lines = []

if spec.get("embedding"):
    path, at = spec["embedding"]["file"], spec["embedding"]["at"]
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
    report["embedding"] = {"probe": probe(path), "vectors": rows}

if spec.get("merged"):
    with torch.no_grad():
        for name, text in text_encoders(spec["merged"]).items():
            out[f"merged.{name}"] = text(inputs["ids"]).last_hidden_state

save_file({k: v.float().contiguous() for k, v in out.items()}, out_path)
with open(out_path + ".json", "w") as f:
    json.dump(report, f, indent=2)
print(json.dumps(report, indent=2))
