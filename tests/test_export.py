"""Every export format, proven by reloading it the way a user would and drawing the run's own image.

The run trains a LoRA on the U-Net and the text encoder of a tiny pipeline with SD1.5's block structure,
with alpha (1) different from rank (4), so a loader that assumes alpha = rank draws another image.
"""

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from tests.helpers import PROMPT, image_of, train_in_process
from tuner.export.metadata import model_hash, sha256_file

TABLE = Path(__file__).parent / "data" / "sd15_tiny_lora_keys.tsv"
ALL_FORMATS = "export.formats=[diffusers,kohya,peft,merged,single_file]"


@pytest.fixture(scope="module")
def sd15_tiny(tmp_path_factory) -> Path:
    from tuner.models.tiny import make_tiny_pipeline

    return make_tiny_pipeline(tmp_path_factory.mktemp("sd15") / "pipe", size="layout")


def train(tmp_path, tiny, *overrides, name="run"):
    return train_in_process(
        tmp_path, tiny, "data.resolution=32", "adapter.rank=4", "adapter.alpha=1", *overrides, name=name
    )


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, sd15_tiny):
    tmp = tmp_path_factory.mktemp("lora")
    run = train(tmp, sd15_tiny, "text_encoder.train=lora", ALL_FORMATS)
    return run, image_of(run, PROMPT)


def fresh(tiny):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(tiny)


def draw(pipe):
    """The image tuner's gallery draws for PROMPT at seed 0 (DDIM, 3 steps, guidance 3), in [0, 1]."""
    from tests.helpers import sample_like_the_gallery

    return sample_like_the_gallery(pipe, PROMPT, seed=0, steps=3, size=32)


def peft_modules(module) -> int:
    from tuner.export.tensors import tuner_layers

    return len(tuner_layers(module))


def load_lora_checked(pipe, file: Path, caplog) -> None:
    """``load_lora_weights`` that fails on any warning diffusers or peft logs (unloaded or unexpected keys)."""
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        pipe.load_lora_weights(file.parent, weight_name=file.name)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    with safe_open(file, "pt") as f:
        has = {
            "CLIPTextModel": any(k.startswith(("lora_te", "text_encoder.")) for k in f.keys()),
            "UNet2DConditionModel": any(k.startswith(("lora_unet", "unet.")) for k in f.keys()),
        }
    for model, present in has.items():  # diffusers notes that a file has nothing for a component: true
        if not present:
            warnings = [w for w in warnings if not w.startswith(f"No LoRA keys associated to {model}")]
    assert not warnings, warnings


def test_diffusers_and_kohya_files_reload_to_the_same_image(lora_run, sd15_tiny, caplog):
    run, expected = lora_run
    base = draw(fresh(sd15_tiny))
    assert np.abs(base - expected).max() > 0.02  # the adapter matters at this seed
    for file in (run.dir / "diffusers" / "pytorch_lora_weights.safetensors", run.dir / "kohya" / "run.safetensors"):
        pipe = fresh(sd15_tiny)
        load_lora_checked(pipe, file, caplog)
        with safe_open(file, "pt") as f:
            keys = list(f.keys())
        modules = {k.split(".lora")[0].split(".alpha")[0] for k in keys if "lora" in k}
        assert peft_modules(pipe.unet) + peft_modules(pipe.text_encoder) == len(modules), file  # every key applied
        np.testing.assert_allclose(draw(pipe), expected, atol=1e-3, err_msg=str(file))
    # CLIP's names as transformers 4.x spells them (diffusers with it, and ComfyUI, read only these)
    with safe_open(run.dir / "diffusers" / "pytorch_lora_weights.safetensors", "pt") as f:
        text = [k for k in f.keys() if k.startswith("text_encoder.")]
    assert text and all(k.startswith("text_encoder.text_model.encoder.layers.") for k in text)


def test_kohya_keys_alpha_and_metadata(lora_run):
    run, _ = lora_run
    file = run.dir / "kohya" / "run.safetensors"
    table = dict(line.split("\t") for line in TABLE.read_text().splitlines() if not line.startswith("#"))
    with safe_open(file, "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
        alphas = {k: f.get_tensor(k) for k in keys if k.endswith(".alpha")}
        ranks = {f.get_tensor(k).shape[0] for k in keys if k.endswith("lora_down.weight")}
    assert all(k.startswith(("lora_unet_", "lora_te_")) for k in keys)  # diffusers' kohya detection needs this
    modules = {k.split(".")[0] for k in keys}
    assert modules <= set(table), sorted(modules - set(table))[:5]
    # adapter.targets=attn_ff: every linear layer of the U-Net's transformers (the table's *_attentions_* rows),
    # text_encoder.target_modules: q/k/v/out of every CLIP layer
    expected = {m for m in table if m.startswith("lora_te_") and "self_attn" in m}
    expected |= {m for m in table if m.startswith("lora_unet_") and "_attentions_" in m}
    assert modules == expected
    for module in modules:
        for suffix in ("lora_down.weight", "lora_up.weight", "alpha"):
            assert f"{module}.{suffix}" in keys
    assert ranks == {4} and {float(v) for v in alphas.values()} == {1.0}  # the trained alpha, not the rank
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "1.0"
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_base_model_version"] == "sd_v1"
    assert meta["ss_resolution"] == "(32, 32)" and meta["ss_max_train_steps"] == "3"
    assert json.loads(meta["ss_tag_frequency"]) == {"instance": {PROMPT: 3}}
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora" and meta["modelspec.trigger_phrase"] == PROMPT
    assert meta["sshs_model_hash"] == model_hash(file)  # A1111's hash: sha256 of the bytes after the header
    assert meta["modelspec.hash_sha256"] == "0x" + model_hash(file)
    assert meta["ss_new_sd_model_hash"] and len(meta["ss_new_sd_model_hash"]) == 64
    assert not any(str(run.dir.parent) in v or "/tmp" in v for v in meta.values())  # no paths of this machine


def test_peft_folders_reload_with_peft(lora_run, sd15_tiny):
    from peft import PeftModel

    run, expected = lora_run
    pipe = fresh(sd15_tiny)
    for component in ("unet", "text_encoder"):
        folder = run.dir / "peft" / component
        assert json.loads((folder / "adapter_config.json").read_text())["lora_alpha"] == 1
        setattr(pipe, component, PeftModel.from_pretrained(getattr(pipe, component), folder))
    np.testing.assert_allclose(draw(pipe), expected, atol=1e-3)


def test_merged_pipeline_and_its_fp16_variant(lora_run):
    from diffusers import StableDiffusionPipeline

    run, expected = lora_run
    pipe = StableDiffusionPipeline.from_pretrained(run.dir / "merged", use_safetensors=True)
    assert peft_modules(pipe.unet) == 0 and pipe.unet.dtype == torch.float32  # fused: plain weights
    np.testing.assert_allclose(draw(pipe), expected, atol=1e-3)
    half = StableDiffusionPipeline.from_pretrained(
        run.dir / "merged", variant="fp16", use_safetensors=True, dtype=torch.float32
    )
    with safe_open(run.dir / "merged" / "unet" / "diffusion_pytorch_model.fp16.safetensors", "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
    # the text encoder's keys as transformers 4.x reads them (5.x reads both; the tiny base has no prefix)
    for name in ("model.safetensors", "model.fp16.safetensors"):
        with safe_open(run.dir / "merged" / "text_encoder" / name, "pt") as f:
            keys = set(f.keys())
        assert keys == {f"text_model.{k}" for k in pipe.text_encoder.state_dict()} - {"text_model.position_ids"}
    np.testing.assert_allclose(draw(half), expected, atol=3e-2)
    # the fused weights are the base plus kohya's formula, up @ down * alpha / rank, module by module
    base, fused = fresh_unet_state(run), pipe.unet.state_dict()
    with safe_open(run.dir / "kohya" / "run.safetensors", "pt") as f:
        modules = {k.split(".")[0] for k in f.keys() if k.startswith("lora_unet_")}
        for module in modules:
            down, up = f.get_tensor(f"{module}.lora_down.weight"), f.get_tensor(f"{module}.lora_up.weight")
            delta = kohya_delta(
                {"lora_down.weight": down, "lora_up.weight": up, "alpha": f.get_tensor(f"{module}.alpha")}
            )
            name = weight_named(base, module)
            torch.testing.assert_close(fused[name] - base[name], delta.reshape(base[name].shape), atol=1e-6, rtol=1e-4)
    assert len(modules) > 20


def fresh_unet_state(run):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(Path(run.cfg.model.path) / "unet").state_dict()


def weight_named(state, module: str) -> str:
    """The state-dict key of a kohya module name: ``lora_unet_down_blocks_0_...`` -> ``down_blocks.0....weight``,
    ``lora_te_text_model_encoder_...`` -> ``encoder....weight`` (transformers 5 has no ``text_model.`` level)."""
    prefix, _, rest = module.partition("_unet_") if "_unet_" in module else module.partition("_te_")
    rest = rest.removeprefix("text_model_")
    return next(n for n in state if n.endswith(".weight") and n[: -len(".weight")].replace(".", "_") == rest)


def test_single_file_loads_with_a_local_config(lora_run, sd15_tiny):
    from diffusers import StableDiffusionPipeline

    run, expected = lora_run
    file = run.dir / "single_file" / "run.safetensors"
    pipe = StableDiffusionPipeline.from_single_file(file, config=str(sd15_tiny), local_files_only=True)
    np.testing.assert_allclose(draw(pipe), expected, atol=1e-3)
    # the original-layout modules ComfyUI and A1111 apply LoRA keys to are all in the file
    with safe_open(file, "pt") as f:
        keys = set(f.keys())
    for line in TABLE.read_text().splitlines():
        if line.startswith("lora_unet_"):
            assert f"model.diffusion_model.{line.split(chr(9))[1]}.weight" in keys, line
        elif line.startswith("lora_te_"):
            assert f"cond_stage_model.transformer.{line.split(chr(9))[1]}.weight" in keys, line


def test_summary_lists_every_file_with_its_hash_and_the_card_says_how_to_load(lora_run):
    run, _ = lora_run
    summary = json.loads((run.dir / "summary.json").read_text())
    written = {
        str(p.relative_to(run.dir))
        for fmt in ("diffusers", "kohya", "peft", "merged", "single_file")
        for p in (run.dir / fmt).rglob("*")
        if p.is_file()
    }
    assert set(summary["files"]) == written
    for name, entry in summary["files"].items():
        assert entry["sha256"] == sha256_file(run.dir / name) and entry["bytes"] == (run.dir / name).stat().st_size
    card = (run.dir / "README.md").read_text()
    assert card.startswith("---\nlibrary_name:") and "base_model:" in card
    assert f"Trigger: `{PROMPT}`" in card and "load_lora_weights" in card and "<lora:run:1>" in card
    assert "| rank / alpha | 4 / 1.0 |" in card
    # which file is for which program (tests/test_clients.py: the kohya file loads whole in ComfyUI and InvokeAI)
    assert "`diffusers/pytorch_lora_weights.safetensors` is for diffusers: ComfyUI reads it only in part" in card
    for name in summary["files"]:
        assert f"`{name}`" in card


def test_textual_inversion_exports_load_in_diffusers_and_as_a1111_embeddings(tmp_path, sd15_tiny):
    from diffusers import StableDiffusionPipeline

    run = train(
        tmp_path,
        sd15_tiny,
        "adapter=none",
        "embedding.tokens=['<sks>']",
        "embedding.vectors=2",
        "data.instance_prompt='a photo of <sks>'",
        "export.formats=[diffusers,kohya,merged]",
    )
    prompt = "a photo of <sks>"
    expected = image_of(run, prompt)
    with safe_open(run.dir / "kohya" / "embeddings" / "sks.safetensors", "pt") as f:
        assert list(f.keys()) == ["emb_params"] and f.get_tensor("emb_params").shape == (2, 16)
    for file in (
        run.dir / "diffusers" / "embeddings" / "sks.safetensors",
        run.dir / "kohya" / "embeddings" / "sks.safetensors",
    ):
        pipe = fresh(sd15_tiny)
        pipe.load_textual_inversion(file, token="<sks>")
        image = sample_prompt(pipe, prompt)
        np.testing.assert_allclose(image, expected, atol=1e-3, err_msg=str(file))
    merged = StableDiffusionPipeline.from_pretrained(run.dir / "merged")
    np.testing.assert_allclose(sample_prompt(merged, prompt), expected, atol=1e-3)
    assert not (run.dir / "kohya" / "run.safetensors").exists()  # no adapter trained: embeddings only


def sample_prompt(pipe, prompt):
    from tests.helpers import sample_like_the_gallery

    return sample_like_the_gallery(pipe, prompt, seed=0, steps=3, size=32)


def kohya_delta(t: dict) -> torch.Tensor:
    """A module's weight change from its kohya-format tensors, computed the way ComfyUI's loader does:
    LoRA up @ down, LoHa (w1_a @ w1_b) * (w2_a @ w2_b), LoKr kron(w1, w2) with either factor possibly
    split in two; scaled by alpha / rank where there is an alpha and a rank (the inner size of a split
    factor), by 1 otherwise."""
    if "lora_down.weight" in t:
        down, up = t["lora_down.weight"], t["lora_up.weight"]
        return (up.flatten(1) @ down.flatten(1)) * float(t["alpha"]) / down.shape[0]
    if "hada_w1_a" in t:
        weight, rank = (t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"]), t["hada_w1_b"].shape[0]
    else:
        rank = None
        factors = []
        for w in ("lokr_w1", "lokr_w2"):
            if w in t:
                factors.append(t[w])
            else:
                factors.append(t[f"{w}_a"] @ t[f"{w}_b"])
                rank = t[f"{w}_b"].shape[0]
        w1, w2 = factors
        if w2.dim() == 4:  # a convolution: the first factor spans channels only
            w1 = w1[:, :, None, None]
        weight = torch.kron(w1, w2)
    return weight * (float(t["alpha"]) / rank if "alpha" in t and rank else 1.0)


LYCORIS = {
    "loha_with_text_encoder_lora": ["adapter=loha", "text_encoder.train=lora"],
    "lokr_full_factors": ["adapter=lokr"],  # rank 4 >= half the factor sizes: peft keeps both factors whole
    "lokr_split_factor": ["adapter=lokr", "adapter.rank=2"],
}


@pytest.mark.e2e
@pytest.mark.parametrize("case", list(LYCORIS))
def test_lycoris_kohya_files_add_up_to_the_merged_weights(tmp_path, sd15_tiny, case):
    """No diffusers loader reads LyCORIS keys, so the kohya file is checked against ComfyUI's formulas: each
    module's change equals merged minus base; merged and single-file exports draw the run's own image."""
    from diffusers import StableDiffusionPipeline

    run = train(tmp_path, sd15_tiny, *LYCORIS[case], "adapter.alpha=2", "export.formats=[kohya,merged,single_file]")
    expected = image_of(run, PROMPT)
    merged = StableDiffusionPipeline.from_pretrained(run.dir / "merged")
    np.testing.assert_allclose(draw(merged), expected, atol=1e-3)
    single = StableDiffusionPipeline.from_single_file(
        run.dir / "single_file" / "run.safetensors", config=str(sd15_tiny), local_files_only=True
    )
    np.testing.assert_allclose(draw(single), expected, atol=1e-3)
    reference = fresh(sd15_tiny)
    with safe_open(run.dir / "kohya" / "run.safetensors", "pt") as f:
        assert f.metadata()["ss_network_module"] == "lycoris.kohya"
        modules = {k.split(".")[0] for k in f.keys()}
        for module in modules:
            tensors = {k.split(".", 1)[1]: f.get_tensor(k) for k in f.keys() if k.split(".")[0] == module}
            component = "unet" if module.startswith("lora_unet_") else "text_encoder"
            base, fused = getattr(reference, component).state_dict(), getattr(merged, component).state_dict()
            name = weight_named(base, module)
            delta = kohya_delta(tensors).reshape(base[name].shape)
            torch.testing.assert_close(fused[name] - base[name], delta, atol=1e-6, rtol=1e-4)
    assert any(m.startswith("lora_unet_") for m in modules)
    assert any(m.startswith("lora_te_") for m in modules) == ("text_encoder" in case)


@pytest.mark.e2e
def test_export_recipe_converts_a_kohya_file_a_run_and_a_base(lora_run, sd15_tiny, tmp_path):
    """``python -m tuner recipe=export``: the kohya file back to diffusers and a single file; a run folder
    (its base model found in the run's config) to a merged pipeline; a bare base to one original-layout file."""
    from diffusers import StableDiffusionPipeline

    from tests.helpers import run_tuner

    run, expected = lora_run
    common = {"home": tmp_path / "home", "cwd": tmp_path}
    result = run_tuner(
        "recipe=export",
        f"checkpoint={run.dir / 'kohya' / 'run.safetensors'}",
        f"model.path={sd15_tiny}",
        "export.formats=[diffusers,single_file]",
        f"output_dir={tmp_path / 'from_kohya'}",
        **common,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    pipe = fresh(sd15_tiny)
    pipe.load_lora_weights(tmp_path / "from_kohya" / "diffusers")
    np.testing.assert_allclose(draw(pipe), expected, atol=1e-3)
    single = StableDiffusionPipeline.from_single_file(
        tmp_path / "from_kohya" / "single_file" / "from_kohya.safetensors", config=str(sd15_tiny), local_files_only=True
    )
    np.testing.assert_allclose(draw(single), expected, atol=1e-3)

    result = run_tuner(
        "recipe=export", f"checkpoint={run.dir}", "export.formats=[merged]", f"output_dir={tmp_path / 'm'}", **common
    )
    assert result.returncode == 0, result.stderr[-3000:]
    np.testing.assert_allclose(
        draw(StableDiffusionPipeline.from_pretrained(tmp_path / "m" / "merged")), expected, atol=1e-3
    )
    card = (tmp_path / "m" / "README.md").read_text()
    assert "| rank / alpha | 4 / 1.0 |" in card  # the settings come from the run the checkpoint belongs to

    result = run_tuner(
        "recipe=export",
        f"model.path={sd15_tiny}",
        "export.formats=[single_file]",
        f"output_dir={tmp_path / 'base'}",
        **common,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    single = StableDiffusionPipeline.from_single_file(
        tmp_path / "base" / "single_file" / "base.safetensors", config=str(sd15_tiny), local_files_only=True
    )
    reference = fresh(sd15_tiny)
    for name in ("unet", "vae", "text_encoder"):
        a, b = getattr(reference, name).state_dict(), getattr(single, name).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name

    only_adapters = ["export.formats=[diffusers,kohya]", f"output_dir={tmp_path / 'no'}"]
    refused = run_tuner("recipe=export", f"model.path={sd15_tiny}", *only_adapters, **common)
    assert refused.returncode == 2 and "single_file" in refused.stderr  # nothing but the base: no adapter format
    unset = run_tuner("recipe=export", f"model.path={sd15_tiny}", f"output_dir={tmp_path / 'unset'}", **common)
    assert unset.returncode == 0 and (tmp_path / "unset" / "merged" / "model_index.json").is_file()  # what holds it


def test_a_format_that_cannot_hold_the_adapter_says_so_and_writes_nothing_wrong(tmp_path, sd15_tiny, capsys):
    run = train(
        tmp_path, sd15_tiny, "adapter.use_dora=true", "adapter.targets=attn", "export.formats=[diffusers,kohya]"
    )
    assert "export kohya: skipped" in capsys.readouterr().out
    assert not (run.dir / "kohya").exists()  # a kohya file without DoRA's magnitudes would load as another model
    pipe = fresh(sd15_tiny)
    pipe.load_lora_weights(run.dir / "diffusers")
    np.testing.assert_allclose(draw(pipe), image_of(run, PROMPT), atol=1e-3)


KOHYA_CASES = {
    "rslora": ["adapter.use_rslora=true", "adapter.alpha=8"],  # scale alpha / sqrt(rank): kohya's alpha = scale * rank
    "locon_convolutions": ["adapter.targets=locon"],  # conv LoRA: 4-D down and up weights
    "text_encoder_only": ["adapter=none", "text_encoder.train=lora"],
}


@pytest.mark.e2e
@pytest.mark.parametrize("case", list(KOHYA_CASES))
def test_kohya_file_reloads_for_each_lora_variant(tmp_path, sd15_tiny, case, caplog):
    run = train(tmp_path, sd15_tiny, *KOHYA_CASES[case], "export.formats=[kohya]")
    file = run.dir / "kohya" / "run.safetensors"
    pipe = fresh(sd15_tiny)
    load_lora_checked(pipe, file, caplog)
    with safe_open(file, "pt") as f:
        modules = {k.split(".")[0] for k in f.keys()}
        kernels = {f.get_tensor(k).shape[-1] for k in f.keys() if k.endswith("lora_down.weight")}
    assert peft_modules(pipe.unet) + peft_modules(pipe.text_encoder) == len(modules)
    assert (3 in kernels) == (case == "locon_convolutions")  # the resnets' 3x3 convolutions
    np.testing.assert_allclose(draw(pipe), image_of(run, PROMPT), atol=1e-3)


@pytest.mark.e2e  # a bf16 run: -m e2e keeps the fast tier under 3 minutes
def test_bf16_training_exports_merged_weights_on_the_fp32_base(tmp_path, sd15_tiny):
    """Mixed precision stores the frozen U-Net in bf16; the merged export must fuse onto the fp32 base."""
    from diffusers import StableDiffusionPipeline

    run = train(tmp_path, sd15_tiny, "train.mixed_precision=bf16", "export.formats=[kohya,merged]")
    assert {p.dtype for n, p in run.components.unet.named_parameters() if "lora_" not in n} == {torch.bfloat16}
    base, fused = fresh_unet_state(run), StableDiffusionPipeline.from_pretrained(run.dir / "merged").unet.state_dict()
    with safe_open(run.dir / "kohya" / "run.safetensors", "pt") as f:
        adapted = {}
        for module in {k.split(".")[0] for k in f.keys()}:
            tensors = {k.split(".", 1)[1]: f.get_tensor(k) for k in f.keys() if k.split(".")[0] == module}
            adapted[weight_named(base, module)] = kohya_delta(tensors)
    for name, value in base.items():
        if name in adapted:
            torch.testing.assert_close(fused[name] - value, adapted[name].reshape(value.shape), atol=1e-6, rtol=1e-4)
        else:
            assert torch.equal(fused[name], value), name  # untouched and never rounded through bf16


def test_no_export_names_a_path_of_this_machine(lora_run, sd15_tiny):
    run, _ = lora_run
    paths = [str(sd15_tiny), str(run.dir), str(Path(sd15_tiny).parent)]
    for file in [run.dir / "README.md"] + [
        p
        for fmt in ("diffusers", "kohya", "peft", "merged", "single_file")
        for p in (run.dir / fmt).rglob("*")
        if p.is_file()
    ]:
        if file.suffix == ".safetensors":
            with safe_open(file, "pt") as f:
                text = json.dumps(f.metadata() or {})
        else:
            text = file.read_text()
        assert not any(p in text for p in paths), file


def test_the_cards_kohya_lines_name_only_the_programs_that_read_the_familys_file():
    """A1111 reads no Flux or SD3 LoRA and InvokeAI no SD3 LoRA (its loader has no SD3 branch): the card says so."""
    from tuner.export.formats import _kohya_usage
    from tuner.models import get_family

    def card(name):
        return "\n".join(_kohya_usage(["kohya/r.safetensors"], "base", get_family(name), "x"))

    assert all(p in card("sdxl") for p in ("A1111", "Forge", "ComfyUI", "InvokeAI"))
    assert "A1111" not in card("flux") and "InvokeAI" in card("flux")
    sd3 = card("sd3")
    assert "ComfyUI" in sd3 and not any(p in sd3 for p in ("A1111", "Forge", "InvokeAI"))
