"""What Krea 2 alone does, against Krea2Pipeline on a tiny pipeline of its real classes: prompts as
``get_text_hidden_states`` encodes them (the fixed-length template with its padding inside, the tapped layers
stacked), the transformer called as the pipeline calls it, the pipeline's CFG (on whenever guidance > 0), Turbo
refused as a training base; the kohya file is ComfyUI's names for Krea's single file, which diffusers' converter
reads back. What every family does is in tests/test_conformance.py."""

import json
import shutil
import subprocess

import pytest
import torch

from tests.helpers import patched_as_comfyui, tiny_family, train_in_process
from tuner.models.krea2 import DISTILLED, DROPPED, PREFIX, SUFFIX, Krea2

NAME = Krea2.NAME
LENGTH = 32  # the tiny pipeline's model.max_sequence_length (TINY_OPTIONS)
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def krea(tmp_path_factory):
    """(the family at the tiny options, its components loaded as a user's folder, the folder's pipeline, folder)."""
    return tiny_family(tmp_path_factory, NAME, "Krea-2-Raw", max_sequence_length=LENGTH)


def test_prompts_are_encoded_as_the_pipeline_encodes_them(krea):
    """The folder's taps stacked per token past the 34-token system prefix, the padding inside the template (the
    closing tokens last, read at positions that skip the padding), a long prompt cut where the pipeline cuts it."""
    family, c, pipe, folder = krea
    assert json.loads((folder / "model_index.json").read_text())["text_encoder_select_layers"] == [1, 2]
    assert len(c.tokenizer(PREFIX).input_ids) == DROPPED and len(c.tokenizer(SUFFIX).input_ids) == 5
    prompts = ["a cat", "a photo of a dog on a beach, 35mm", "", "a very long prompt " * 20]
    ours = family.encode_prompts(c, prompts)
    embeds, mask = pipe.get_text_hidden_states(prompts, max_sequence_length=LENGTH, device=CPU)
    assert ours["prompt_embeds"].shape == embeds.shape == (4, LENGTH, 2, 32)
    assert torch.equal(ours["prompt_embeds_mask"].bool(), mask) and mask[:, -5:].all() and not mask[0, -6]
    torch.testing.assert_close(ours["prompt_embeds"][mask], embeds[mask], rtol=1e-5, atol=1e-6)
    assert not ours["prompt_embeds"][~mask].any()


def test_the_transformer_is_called_as_the_pipeline_calls_it(krea):
    """Packed latents, t / 1000, the joint RoPE grid, the text mask: the pipeline's prediction, unpacked."""
    family, c, pipe, _ = krea
    prompts = ["a cat", "a photo of a dog on a beach"]
    cond = family.encode_prompts(c, prompts)
    torch.manual_seed(0)
    noisy, t = torch.randn(2, 16, 4, 6), torch.tensor([900.0, 250.0])
    with torch.no_grad():
        ours = family.predict(c.denoiser, noisy, t, cond)
        theirs = pipe.transformer(
            hidden_states=pipe._pack_latents(noisy, 2, 16, 4, 6), encoder_hidden_states=cond["prompt_embeds"],
            timestep=t / 1000, position_ids=pipe.prepare_position_ids(LENGTH, 2, 3, CPU),
            encoder_attention_mask=cond["prompt_embeds_mask"].bool(), return_dict=False,
        )[0]  # fmt: skip
    theirs = pipe._unpack_latents(theirs, 4 * pipe.vae_scale_factor, 6 * pipe.vae_scale_factor)[:, :, 0]
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_cfg_is_the_pipelines_at_the_samplings_guidance(krea):
    """Guidance 0 is one pass per step (Turbo's); above it, ``cond + s * (cond - uncond)``; equal to the pipeline's
    image at the same seed."""
    from tuner.sampling import sample_images

    family, c, pipe, _ = krea

    def draw(guidance, negative=None):
        kwargs = family.call_kwargs() | {"guidance": family.guidance_kwargs}
        return sample_images(pipe, ["a cat"], [0], 32, 2, guidance, negative_prompts=negative, decode=family.decode,
                             **kwargs)  # fmt: skip

    plain, guided = draw(0.0), draw(4.5)
    assert (guided - plain).abs().max() > 1e-3 and (draw(2.0) - guided).abs().max() > 1e-3
    assert (draw(4.5, ["blurry"]) - guided).abs().max() > 1e-3  # the negative prompt is read
    image = pipe("a cat", height=32, width=32, num_inference_steps=2, guidance_scale=4.5, max_sequence_length=LENGTH,
                 generator=torch.Generator().manual_seed(0), output_type="pt").images  # fmt: skip
    torch.testing.assert_close(guided / 2 + 0.5, image, rtol=0, atol=1e-5)  # sample_images' are in [-1, 1]


def test_turbo_is_refused_as_a_training_base_and_takes_a_lora_trained_on_the_base(tmp_path, krea):
    """``is_distilled`` in model_index.json (or a Turbo folder name) stops before anything loads with the advice to
    train on the base; the base passes; a LoRA of the base loads onto Turbo whole."""
    from tests.test_toolbox import random_lora
    from tuner.errors import ConfigError
    from tuner.export.tensors import tuner_layers

    family, c, pipe, base = krea
    family.check_trainable(base)
    turbo = shutil.copytree(base, tmp_path / "distilled")
    index = json.loads((turbo / "model_index.json").read_text())
    (turbo / "model_index.json").write_text(json.dumps({**index, "is_distilled": True}))
    for folder in (turbo, shutil.copytree(base, tmp_path / "Krea-2-Turbo")):
        with pytest.raises(ConfigError, match="distilled checkpoint") as refused:
            family.check_trainable(folder)
        assert DISTILLED in str(refused.value)
    lora = random_lora(base, tmp_path / "lora", rank=2, alpha=2.0, seed=1, family=NAME)
    distilled = family.load_pipeline(turbo)
    assert distilled.config.is_distilled
    distilled.load_lora_weights(lora.parent, weight_name=lora.name)
    config = distilled.transformer.config
    blocks = config.num_layers + config.num_layerwise_text_blocks + config.num_refiner_text_blocks
    assert len(tuner_layers(distilled.transformer)) == 5 * blocks  # q, k, v, gate, out of every attention


@pytest.fixture(scope="module")
def trained(tmp_path_factory, krea):
    """A run on the tiny folder writing the diffusers, kohya and merged formats (LoRA on attention and MLP)."""
    *_, base = krea
    return train_in_process(
        tmp_path_factory.mktemp("krea2-run"), base, f"model={NAME}", "data.resolution=32",
        f"model.max_sequence_length={LENGTH}", "train.learning_rate=5e-2", "adapter.targets=attn_ff",
        "export.formats=[diffusers,kohya,merged]",
    )  # fmt: skip


@pytest.mark.e2e
def test_the_kohya_file_patches_the_single_file_to_the_merged_transformer(krea, trained):
    """ComfyUI reads a LoRA key ``lora_unet_<its module, dots as _>`` onto ``<module>.weight`` of its model (Krea's
    original names): each module of tuner's kohya file is one of the single file's. Adding each ``up @ down * alpha /
    rank`` there, as ComfyUI patches, and reading the file back with diffusers' Krea 2 converter gives the merged
    folder's transformer."""
    from diffusers.loaders.single_file_utils import convert_krea2_transformer_checkpoint_to_diffusers

    from tuner.models.base import Family

    family, c, pipe, base = krea
    run = trained
    state, modules = patched_as_comfyui(family, c, run.dir / "kohya" / f"{run.dir.name}.safetensors")
    wanted = ("blocks_0_attn_wq", "blocks_1_mlp_up", "first", "tproj_1", "txtfusion_projector",
              "txtfusion_refiner_blocks_0_attn_gate")  # fmt: skip
    assert {f"lora_unet_{m}" for m in wanted} <= modules
    back = convert_krea2_transformer_checkpoint_to_diffusers(dict(state))
    merged = Family.load(family, run.dir / "merged").denoiser.state_dict()
    assert back.keys() == merged.keys()
    for key, value in merged.items():
        torch.testing.assert_close(back[key], value, rtol=0, atol=1e-5, msg=key)
    assert any((merged[k] - v).abs().max() > 1e-4 for k, v in c.denoiser.state_dict().items())  # it trained


@pytest.mark.clients
def test_invokeai_reads_both_default_files_onto_the_same_modules_at_the_same_deltas(krea, trained):
    """InvokeAI 6.14 (its krea-2 base; ``TUNER_INVOKEAI_PYTHON``) probes the kohya and the diffusers file as krea-2
    LoRAs and its LoRALoader reads both onto diffusers' modules, the same layers at the same deltas (tiny widths: the
    real-width base of tests/test_clients_2026.py is past this tier's memory)."""
    from tests.clients.common import invokeai_python

    _, c, _, _ = krea
    run = trained
    files = [
        run.dir / "kohya" / f"{run.dir.name}.safetensors",
        run.dir / "diffusers" / "pytorch_lora_weights.safetensors",
    ]
    modules = {k.split(".")[0] for k in load_file_keys(files[0])}
    out = subprocess.run([invokeai_python(), "-c", INVOKEAI_READS, *map(str, files)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    kohya, diffusers = json.loads(out.stdout.strip().splitlines()[-1])
    linear = {name for name, m in c.denoiser.named_modules() if isinstance(m, torch.nn.Linear)}
    assert set(kohya) == set(diffusers) and set(kohya) <= linear and len(kohya) == len(modules)
    assert {"transformer_blocks.0.attn.to_q", "text_fusion.projector", "time_mod_proj"} <= set(kohya)
    for name, delta in kohya.items():
        assert abs(delta - diffusers[name]) <= 1e-4 * max(1.0, abs(delta)), name


def load_file_keys(path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return list(f.keys())


# each file through InvokeAI's model probe (a krea-2 LoRA) and its LoRALoader: {diffusers module: its delta's norm}
INVOKEAI_READS = """
import json, sys
import torch
from invokeai.backend.model_manager.configs.factory import ModelConfigFactory
from invokeai.backend.model_manager.load.model_loaders.lora import LoRALoader
from invokeai.backend.patches.lora_conversions.krea2_lora_constants import KREA2_LORA_TRANSFORMER_PREFIX as prefix
found = []
for file in sys.argv[1:]:
    config = ModelConfigFactory.from_model_on_disk(file).config
    assert (config.type.value, config.base.value) == ("lora", "krea-2"), (file, config.type, config.base)
    loader = LoRALoader.__new__(LoRALoader)  # its _load_model reads no more of the app than these
    loader._model_base, loader._torch_dtype = config.base, torch.float32
    layers = loader._load_model(config).layers
    assert all(key.startswith(prefix) for key in layers), sorted(layers)
    delta = {key[len(prefix):]: layer.get_weight(None).float().norm() * layer.scale() for key, layer in layers.items()}
    found.append({key: float(value) for key, value in delta.items()})
print(json.dumps(found))
"""
