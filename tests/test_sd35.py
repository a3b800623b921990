"""SD3.5 under ``model=sd3``: tiny pipelines of SD3.5 Medium's shape (MMDiT-X: a dual-attention first block, qk
norm) and SD3.5 Large's (qk norm), from ``SD3.build_tiny(size=...)``, through what SD3's conformance run does not
reach on SD3's own shape: the single file as Stability ships it (the transformer in the original MMDiT names, with
or without the text encoders and VAE beside it) read back by diffusers' converter, kohya names for ``attn2`` and
``ln_q``/``ln_k`` that are the single file's own (ComfyUI's LoRA loader maps ``lora_unet_`` + a model key, and
detects MMDiT-X and qk norm from those keys), a LoRA run reaching ``attn2`` whose diffusers file the pipeline
reloads whole, partial and full runs, skip-layer guidance equal to the pipeline's, and Large Turbo refused."""

import pytest
import torch
from safetensors.torch import save_file

from tests.helpers import PROMPT, train_in_process
from tuner.config import ModelConfig
from tuner.models.sd3 import SD3

SIZES = ("3.5-medium", "3.5-large")
ARGS = ("model=sd3", "model.max_sequence_length=32", "data.resolution=32")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """``folder(size)``: SD3's tiny pipeline of that shape, saved with save_pretrained (once per module)."""
    made = {}

    def get(size: str, name: str = ""):
        if (size, name) not in made:
            family = SD3()
            pipe = family.pipeline_class()(**family.build_tiny(0, size))
            made[size, name] = tmp_path_factory.mktemp(name or size) / (name or "base")
            pipe.save_pretrained(made[size, name], safe_serialization=True)
        return made[size, name]

    return get


def random_transformer(folder):
    """The folder's transformer with every parameter random (qk norms and modulations included), so a misplaced
    or swapped tensor shows."""
    from diffusers import SD3Transformer2DModel

    model = SD3Transformer2DModel.from_pretrained(folder / "transformer")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return model


def test_the_tiny_sizes_have_sd35s_modules(folder):
    """Medium: attn2 in its first block only, RMS qk norms in both attentions; Large: qk norm, no attn2."""
    from diffusers import SD3Transformer2DModel

    medium = SD3Transformer2DModel.from_pretrained(folder("3.5-medium") / "transformer")
    large = SD3Transformer2DModel.from_pretrained(folder("3.5-large") / "transformer")
    names = {n for n, _ in medium.named_modules()}
    assert {"transformer_blocks.0.attn2.to_q", "transformer_blocks.0.attn2.norm_q"} <= names
    assert "transformer_blocks.1.attn.norm_k" in names
    assert "transformer_blocks.1.attn2" not in names
    assert not [n for n, _ in large.named_modules() if ".attn2" in n] and large.config.qk_norm == "rms_norm"


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("whole", [False, True], ids=["transformer", "with-text-encoders"])
def test_stabilitys_single_file_reads_back_through_the_family(tmp_path, folder, size, whole):
    """sd3.5_medium/large.safetensors: the transformer under ``model.diffusion_model.`` (with the VAE and the text
    encoders beside it in the files that include them); ``model.path=FILE model.config=FOLDER`` converts it with
    ``SD3Transformer2DModel.from_single_file`` to the same weights. The original names hold SD3.5's modules:
    ComfyUI's model detection reads qk norm from ``context_block.attn.ln_q`` and MMDiT-X from ``x_block.attn2.qkv``."""
    family, base = SD3(), folder(size)
    model = random_transformer(base)
    state = family.single_file_state({"transformer": model}, {})
    assert {"joint_blocks.0.context_block.attn.ln_q.weight", "joint_blocks.0.x_block.attn.ln_k.weight"} <= set(state)
    assert ("joint_blocks.0.x_block.attn2.qkv.weight" in state) == (size == "3.5-medium")
    assert ("joint_blocks.0.x_block.attn2.ln_q.weight" in state) == (size == "3.5-medium")
    shipped = {f"model.diffusion_model.{k}": v for k, v in state.items()}
    if whole:  # what the full checkpoints hold beside it: tuner takes those from model.config's folder
        shipped["first_stage_model.decoder.conv_in.weight"] = torch.zeros(2, 2)
        shipped["text_encoders.clip_l.transformer.text_model.final_layer_norm.weight"] = torch.zeros(2)
        shipped["text_encoders.t5xxl.transformer.shared.weight"] = torch.zeros(2, 2)
    save_file(shipped, tmp_path / "sd3.5.safetensors")
    out = family.from_single_file(tmp_path / "sd3.5.safetensors", base, tmp_path / "converted")
    back = family.load(out).denoiser.state_dict()
    assert back.keys() == model.state_dict().keys()
    for key, value in model.state_dict().items():
        assert torch.equal(back[key], value), key


def test_kohya_names_of_sd35s_modules_are_the_single_files_keys(folder):
    """ComfyUI reads a kohya key ``lora_unet_X`` where its model has the weight X (the single file's names, under
    ``diffusion_model.``): every module a LoRA on all of Medium's linears (attn2 included) writes is one of them,
    attn2's q, k and v as one fused ``x_block.attn2.qkv``."""
    from peft import LoraConfig

    from tuner.export.tensors import Trained, kohya_state

    family = SD3()
    model = random_transformer(folder("3.5-medium"))
    targets = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
    model.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=targets, init_lora_weights="gaussian"))
    trained = Trained(type("Run", (), {"trainable": lambda self: {"transformer": model}})(), "lora")
    written = {k.split(".")[0] for k in kohya_state(trained, family, torch.float32)}
    originals = {k.removesuffix(".weight").replace(".", "_") for k in family.single_file_state(
        {"transformer": model.__class__.from_config(model.config)}, {}) if k.endswith(".weight")}  # fmt: skip
    modules = {w.removeprefix("lora_unet_") for w in written}
    assert {"joint_blocks_0_x_block_attn2_qkv", "joint_blocks_0_x_block_attn2_proj"} <= modules
    assert modules <= originals, modules - originals


def test_skip_layer_guidance_draws_as_the_pipeline(folder):
    """model.skip_guidance_layers: the gallery's and generate's call (``call_kwargs``) is the pipeline's
    ``skip_guidance_layers``, the same image at the same seed; it changes the image (10 steps: the pipeline skips
    between 1% and 20% of them, exclusive, so the second step has the extra pass)."""
    from tuner.sampling import sample_images

    base = folder("3.5-medium")
    drawn = {}
    for layers in (None, [1]):
        family = SD3(ModelConfig(max_sequence_length=32, skip_guidance_layers=layers))
        pipe = family.pipeline(family.load(base))
        drawn[str(layers)] = sample_images(pipe, [PROMPT], [0], 32, 10, 3.0, decode=family.decode,
                                           guidance=family.guidance_kwargs, **family.call_kwargs())[0]  # fmt: skip
    assert family.call_kwargs()["skip_guidance_layers"] == [1]
    theirs = pipe(prompt=PROMPT, height=32, width=32, num_inference_steps=10, guidance_scale=3.0,
                  max_sequence_length=32, skip_guidance_layers=[1], generator=torch.Generator().manual_seed(0),
                  output_type="pt").images[0]  # fmt: skip
    torch.testing.assert_close((drawn["[1]"] / 2 + 0.5).clamp(0, 1), theirs, rtol=0, atol=1e-5)
    assert (drawn["[1]"] - drawn["None"]).abs().max() > 1e-4


def test_large_turbo_is_refused_as_a_training_base_and_draws(tmp_path, folder):
    from tuner.checks import validate
    from tuner.compose import compose
    from tuner.errors import ConfigError

    turbo = folder("3.5-large", "stable-diffusion-3.5-large-turbo")
    (tmp_path / "photos").mkdir()
    data = [f"data.instance_dir={tmp_path / 'photos'}", "data.instance_prompt=x", f"output_dir={tmp_path / 'out'}"]
    with pytest.raises(ConfigError, match=r"distilled.*Train on the base \(stable-diffusion-3.5-large\)"):
        validate(compose("lora", ["model=sd3", f"model.path={turbo}", *data]))
    validate(compose("generate", ["model=sd3", f"model.path={turbo}", "generate.prompts=[x]"]))
    validate(compose("lora", ["model=sd3", f"model.path={folder('3.5-large')}", *data]))


@pytest.mark.e2e
def test_a_medium_lora_reaches_attn2_and_its_files_reload(tmp_path, folder):
    """LoRA with the attn preset on Medium: attn2 trains; the diffusers file loads in the pipeline with every key
    read (no module left without its adapter), the kohya file names attn2's fused qkv, the single file reads back
    through from_single_file to the merged transformer."""
    from safetensors import safe_open

    from tuner.export.tensors import tuner_layers

    base = folder("3.5-medium")
    run = train_in_process(tmp_path, base, *ARGS, "export.formats=[diffusers,kohya,single_file,merged]")
    with safe_open(run.dir / "diffusers" / "pytorch_lora_weights.safetensors", "pt") as f:
        keys = set(f.keys())
    modules = {k.rsplit(".lora_", 1)[0].removeprefix("transformer.") for k in keys if k.startswith("transformer.")}
    assert "transformer_blocks.0.attn2.to_q" in modules
    family = SD3(ModelConfig(max_sequence_length=32))
    pipe = family.load_pipeline(base)
    pipe.load_lora_weights(run.dir / "diffusers")
    assert set(tuner_layers(pipe.transformer)) >= modules
    with safe_open(run.dir / "kohya" / f"{run.dir.name}.safetensors", "pt") as f:
        assert "lora_unet_joint_blocks_0_x_block_attn2_qkv.lora_down.weight" in set(f.keys())
    single = next((run.dir / "single_file").glob("*.safetensors"))
    back = family.load(family.from_single_file(single, base, tmp_path / "back")).denoiser.state_dict()
    merged = family.load(run.dir / "merged").denoiser.state_dict()
    original = family.load(base).denoiser.state_dict()
    for key in ("transformer_blocks.0.attn2.to_q.weight", "transformer_blocks.0.attn.to_q.weight"):
        torch.testing.assert_close(back[key], merged[key], rtol=0, atol=1e-6)
        assert (back[key] - original[key]).abs().max() > 0, key  # the adapter was merged in


@pytest.mark.e2e
@pytest.mark.parametrize("method, size", [("partial_unet", "3.5-medium"), ("full", "3.5-large")])
def test_partial_and_full_training_move_sd35(tmp_path, folder, method, size):
    """adapter=partial_unet on Medium (sd3's default glob ``transformer_blocks.*.attn*``: the joint attention, its qk
    norms and Medium's attn2) and adapter=full on Large: the merged transformer moved from the base where it trains."""
    base = folder(size)
    run = train_in_process(tmp_path, base, *ARGS, f"adapter={method}", "export.formats=[merged]")
    family = SD3(ModelConfig(max_sequence_length=32))
    trained, original = family.load(run.dir / "merged").denoiser, family.load(base).denoiser
    moved = {n for n, p in trained.named_parameters() if not torch.equal(p, original.get_parameter(n))}
    assert "transformer_blocks.0.attn.to_q.weight" in moved
    assert ("transformer_blocks.0.attn2.to_q.weight" in moved) == (size == "3.5-medium")
    assert ("transformer_blocks.0.ff.net.0.proj.weight" in moved) == (method == "full")


@pytest.mark.clients
def test_invokeai_takes_a_merged_sd35_folder_as_sd3_and_none_of_its_lora_or_single_files(tmp_path, folder):
    """InvokeAI 6.14 has SD3 main models as diffusers folders only (``Main_Diffusers_SD3_Config``; its starter models
    list SD3.5 Medium and Large): its probe calls the merged export of a Medium-shaped run an sd-3 main model and its
    transformer loads with qk norm and dual attention. It has no SD3 checkpoint config and no SD3 LoRA loader: the
    single file and the LoRA files are not sd-3 to it (6.14 calls the diffusers LoRA a Qwen-Image LoRA), which is
    why sd3's CLIENTS name no InvokeAI base (tests/clients/sd3_invokeai_check.py)."""
    import json
    import subprocess

    from tests.clients.common import invokeai_python
    from tests.helpers import ROOT

    python = invokeai_python()
    run = train_in_process(tmp_path, folder("3.5-medium"), *ARGS, "export.formats=[diffusers,kohya,single_file,merged]")
    paths = {
        "merged": run.dir / "merged",
        "diffusers": run.dir / "diffusers" / "pytorch_lora_weights.safetensors",
        "kohya": run.dir / "kohya" / f"{run.dir.name}.safetensors",
        "single_file": next((run.dir / "single_file").glob("*.safetensors")),
    }
    spec, out = tmp_path / "spec.json", tmp_path / "out.json"
    spec.write_text(json.dumps({"paths": {k: str(v) for k, v in paths.items()}}))
    script = ROOT / "tests" / "clients" / "sd3_invokeai_check.py"
    done = subprocess.run([python, str(script), str(spec), str(out)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert {k: report["merged"][k] for k in ("type", "base", "format")} == {
        "type": "main", "base": "sd-3", "format": "diffusers"
    }  # fmt: skip
    assert report["merged"]["transformer"] == {"qk_norm": "rms_norm", "dual_attention_layers": [0], "num_layers": 2}
    for name in ("diffusers", "kohya", "single_file"):
        assert report[name]["base"] != "sd-3", (name, report[name])
