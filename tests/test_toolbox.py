"""The LoRA toolbox (recipes lora_merge, lora_extract, lora_resize, inspect), each checked against an independent
computation: diffusers' own multi-adapter path (``set_adapters``), a direct SVD of the difference
(``torch.linalg.svdvals``), a known low-rank difference put into the base, and the refusals by name.

The inputs are LoRAs with random factors on a tiny SD1.5 pipeline (U-Net attention and resnet convolutions,
text encoder attention), of different ranks and alphas, written by diffusers' own ``save_lora_weights`` and
turned into kohya's keys by tuner's export.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tests.helpers import reference_call
from tuner.errors import ConfigError
from tuner.export.lowrank import Factors, cut_delta, cut_factors, stack
from tuner.models import families, family_names, get_family

PROMPT = "a photo of sks ball"
SAMPLE = ['sample.prompts=["a photo of sks ball"]', "sample.seeds=[0,1]", "sample.steps=3", "data.resolution=16"]


def run_recipe_here(recipe: str, *overrides: str):
    """A recipe composed, checked and run in this process (as ``python -m tuner`` does)."""
    from accelerate.state import AcceleratorState, GradientState

    from tuner.checks import validate
    from tuner.compose import compose
    from tuner.runner import run_recipe

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    cfg = compose(recipe, ["log.tensorboard=false", *overrides])
    validate(cfg)
    return run_recipe(cfg)


def random_lora(base: Path, out: Path, rank: int, alpha: float, seed: int, family: str = "sd15") -> Path:
    """A diffusers-format LoRA with random factors on the family's attention (with an SD U-Net's resnet
    convolutions) and its text encoders' attention, saved by diffusers' own ``save_lora_weights``."""
    from peft import LoraConfig

    from tuner.export.formats import LEGACY_PREFIXES
    from tuner.export.tensors import peft_config_dict, peft_state
    from tuner.models import get_family

    f = get_family(family)
    c = f.load(base)
    torch.manual_seed(seed)
    targets = {c.denoiser_name: f.TARGETS["attn"] + (["conv1", "conv2"] if c.denoiser_name == "unet" else [])}
    targets |= {name: ["q_proj", "k_proj", "v_proj", "out_proj"] for name in f.LORA_TEXT_ENCODERS}
    layers = {}
    for name, modules in targets.items():
        module = c.trainable()[name]
        exclude = f.TARGETS_EXCLUDE if name == c.denoiser_name else None  # Flux.2's to_out ModuleList
        config = dict(r=rank, lora_alpha=alpha, target_modules=modules, init_lora_weights=False)
        module.add_adapter(LoraConfig(**config, exclude_modules=exclude))
        with torch.no_grad():
            for key, p in module.named_parameters():
                if "lora_" in key:
                    p.mul_(0.5)
        state, config = peft_state(module)
        prefix = LEGACY_PREFIXES.get(type(module).__name__, "")
        layers[name] = (
            {k if k.startswith(prefix) else prefix + k: v for k, v in state.items()},
            peft_config_dict(config),
        )
    out.mkdir(parents=True, exist_ok=True)
    return f.save_lora(out, layers)


@pytest.fixture(scope="module")
def loras(tmp_path_factory, tiny):
    """Two LoRAs on the tiny SD1.5 pipeline: A (rank 4, alpha 2) as a kohya file, B (rank 3, alpha 6) in diffusers'."""
    base = tiny("sd15")
    root = tmp_path_factory.mktemp("loras")
    a = random_lora(base, root / "a", rank=4, alpha=2.0, seed=1)
    b = random_lora(base, root / "b", rank=3, alpha=6.0, seed=2)
    run_recipe_here(
        "export",
        f"model.path={base}",
        f"checkpoint={a}",
        "export.formats=[kohya]",
        "export.name=a",
        f"output_dir={root / 'a_kohya'}",
    )
    return base, root / "a_kohya" / "kohya" / "a.safetensors", b


def pipeline(base: Path, loras: list[tuple[Path, float]], family: str = "sd15"):
    """diffusers' pipeline with each LoRA loaded by its own loader, at its weight (``set_adapters``)."""
    from tuner.models import get_family

    pipe = get_family(family).load_pipeline(base)  # as the family reads a folder (Qwen-Image 2.1's processor)
    names = []
    for i, (path, _) in enumerate(loras):
        pipe.load_lora_weights(path.parent, weight_name=path.name, adapter_name=f"l{i}")
        names.append(f"l{i}")
    if names:
        pipe.set_adapters(names, [w for _, w in loras])
    return pipe


def draw(pipe, size: int = 16) -> torch.Tensor:
    import inspect

    generator = torch.Generator().manual_seed(0)
    takes = inspect.signature(pipe.__call__).parameters  # QwenImage21Pipeline's guidance is true CFG's
    guidance = {"guidance_scale": 3.0} if "guidance_scale" in takes else {}
    if "guidance_schedule" in takes:  # Ideogram4Pipeline's default per-step schedule excludes a constant scale
        guidance["guidance_schedule"] = None
    if "num_frames" in takes:  # a video pipeline: a one-frame clip
        guidance["num_frames"] = 1
    call = dict(prompt=PROMPT, num_inference_steps=3, height=size, width=size, generator=generator, output_type="pt")
    only_edits = [f for f in families() if f.PIPELINE == type(pipe).__name__ and reference_call(f)]
    if only_edits:  # a pipeline that only edits edits a gray control
        call |= reference_call(only_edits[0], size)
    out = pipe(**call, **guidance)
    return out.frames if hasattr(out, "frames") else out.images


def deltas(base: Path, lora: Path) -> dict[str, torch.Tensor]:
    """Every module's weight difference that ``lora`` puts on the base, as diffusers loads it."""
    pipe = pipeline(base, [(lora, 1.0)])
    out = {}
    for component in ("unet", "text_encoder"):
        for name, module in getattr(pipe, component).named_modules():
            if hasattr(module, "lora_A") and "l0" in module.lora_A:
                out[f"{component}.{name}"] = module.get_delta_weight("l0").detach()
    return out


# ---------------------------------------------------------------- the arithmetic


def test_stacking_is_the_weighted_sum_and_a_cut_keeps_what_a_direct_svd_says():
    torch.manual_seed(0)
    a = Factors(torch.randn(4, 12), torch.randn(10, 4))
    b = Factors(torch.randn(3, 12), torch.randn(10, 3))
    stacked = stack([(a, 1.0), (b, -0.5)])
    assert stacked.rank == 7
    torch.testing.assert_close(stacked.delta(), a.delta() - 0.5 * b.delta())
    s = torch.linalg.svdvals(stacked.delta().double())
    cut = cut_factors(stacked, rank=3)
    assert cut.factors.rank == 3
    assert cut.energy == pytest.approx(float((s[:3] ** 2).sum() / (s**2).sum()), rel=1e-6)
    assert float((stacked.delta() - cut.factors.delta()).norm()) == pytest.approx(
        float((s[3:] ** 2).sum().sqrt()), rel=1e-4
    )
    full = cut_factors(stacked, rank=7)
    torch.testing.assert_close(full.factors.delta(), stacked.delta(), atol=1e-5, rtol=1e-5)
    by_energy = cut_factors(stacked, energy=0.9)
    kept = torch.cumsum(s**2, 0) / (s**2).sum()
    assert by_energy.factors.rank == int((kept < 0.9).sum()) + 1


def test_a_convolution_difference_is_cut_as_a_kernel_and_rebuilt_exactly_at_its_rank():
    torch.manual_seed(0)
    known = Factors(torch.randn(2, 6, 3, 3), torch.randn(8, 2, 1, 1))
    cut = cut_delta(known.delta(), rank=2)
    assert cut.factors.down.shape == (2, 6, 3, 3) and cut.factors.up.shape == (8, 2, 1, 1)
    torch.testing.assert_close(cut.factors.delta(), known.delta(), atol=1e-5, rtol=1e-5)
    assert cut.rank_before == 2 and cut.energy == pytest.approx(1.0)


def test_a_randomized_cut_of_a_large_difference_is_near_optimal_and_reports_its_own_error_exactly():
    """Above 2 x (rank + 16) columns a fixed-rank cut uses a randomized SVD: its error is within 1% of the best
    possible (the discarded singular values of a full SVD), and the energy and error it reports are those of
    the factors it returns."""
    torch.manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(300, 300))
    v, _ = torch.linalg.qr(torch.randn(200, 200))
    spectrum = 0.8 ** torch.arange(200.0)  # a decaying spectrum, as fine-tuning differences have
    delta = (u[:, :200] * spectrum) @ v.T
    cut = cut_delta(delta, rank=8)
    best = float((spectrum[8:] ** 2).sum().sqrt())
    actual = float((delta - cut.factors.delta()).norm())
    assert best <= actual <= best * 1.01
    assert cut.error == pytest.approx(actual, rel=1e-4)
    assert cut.energy == pytest.approx(1 - actual**2 / float(delta.norm()) ** 2, abs=1e-6)
    assert cut.rank_before is None  # a randomized SVD does not see the whole spectrum
    known = Factors(torch.randn(5, 200), torch.randn(300, 5))
    again = cut_delta(known.delta(), rank=5)
    assert again.rank_before == 5 and (again.factors.delta() - known.delta()).abs().max() < 1e-4


# ---------------------------------------------------------------- merge


def test_merge_equals_diffusers_set_adapters_in_both_formats(tmp_path, loras):
    base, a, b = loras
    run_recipe_here(
        "lora_merge", f"model.path={base}", f"merge.inputs=[{{path: {a}, weight: 1.0}}, {{path: {b}, weight: 0.5}}]",
        "export.formats=[diffusers,kohya]", "export.name=ab", f"output_dir={tmp_path / 'm'}", *SAMPLE,
    )  # fmt: skip
    reference = draw(pipeline(base, [(a, 1.0), (b, 0.5)]))
    alone = draw(pipeline(base, []))
    assert (reference - alone).abs().max() > 1e-2  # the LoRAs change the image
    for merged in (
        tmp_path / "m" / "diffusers" / "pytorch_lora_weights.safetensors",
        tmp_path / "m" / "kohya" / "ab.safetensors",
    ):
        torch.testing.assert_close(draw(pipeline(base, [(merged, 1.0)])), reference, atol=1e-5, rtol=0)
    report = json.loads((tmp_path / "m" / "merge.json").read_text())
    ranks = {r["module"]: r["rank"] for r in report["modules"]}
    assert ranks["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"] == 7  # 4 + 3
    assert any("resnets.0.conv1" in m for m in ranks)  # convolutions merge too
    card = (tmp_path / "m" / "README.md").read_text()
    assert "Merged from a.safetensors x 1, pytorch_lora_weights.safetensors x 0.5" in card
    page = (tmp_path / "m" / "gallery" / "index.html").read_text()
    labels = re.findall(r"<tr><th>([^<]+)</th><td>", page)
    assert labels == [
        f"{who}: {PROMPT}" for who in ("base", "a.safetensors", "pytorch_lora_weights.safetensors", "merged")
    ]
    cells = tmp_path / "m" / "gallery" / "cells"
    assert (
        np.abs(
            np.asarray(Image.open(cells / "row0_seed0.png"), float)
            - np.asarray(Image.open(cells / "row3_seed0.png"), float)
        ).max()
        > 10
    )


def test_merge_at_a_rank_loses_exactly_the_discarded_singular_values(tmp_path, loras):
    base, a, b = loras
    run_recipe_here(
        "lora_merge", f"model.path={base}", f"merge.inputs=[{{path: {a}, weight: 1.0}}, {{path: {b}, weight: -0.5}}]",
        "merge.rank=2", "export.formats=[diffusers]", f"output_dir={tmp_path / 'm'}", "sample.prompts=[]",
    )  # fmt: skip
    exact_a, exact_b = deltas(base, a), deltas(base, b)
    merged = deltas(base, tmp_path / "m" / "diffusers" / "pytorch_lora_weights.safetensors")
    report = {r["module"]: r for r in json.loads((tmp_path / "m" / "merge.json").read_text())["modules"]}
    assert set(merged) == set(exact_a) | set(exact_b)
    for name, got in merged.items():
        exact = exact_a.get(name, 0) - 0.5 * exact_b.get(name, 0)
        s = torch.linalg.svdvals(exact.flatten(1).double())
        discarded = float((s[2:] ** 2).sum().sqrt())
        assert float((got - exact).norm()) == pytest.approx(discarded, rel=1e-3, abs=1e-6), name
        assert report[name]["energy"] == pytest.approx(float((s[:2] ** 2).sum() / (s**2).sum()), rel=1e-4)


@pytest.mark.e2e
def test_merge_into_base_writes_the_base_with_the_merge_fused_in(tmp_path, loras):
    base, a, b = loras
    run_recipe_here(
        "lora_merge", f"model.path={base}", f"merge.inputs=[{{path: {a}, weight: 1.0}}, {{path: {b}, weight: 0.5}}]",
        "merge.into_base=true", f"output_dir={tmp_path / 'm'}", "sample.prompts=[]", "export.variant=null",
    )  # fmt: skip
    from diffusers import StableDiffusionPipeline

    fused = StableDiffusionPipeline.from_pretrained(tmp_path / "m" / "merged")
    torch.testing.assert_close(draw(fused), draw(pipeline(base, [(a, 1.0), (b, 0.5)])), atol=1e-5, rtol=0)


# ---------------------------------------------------------------- resize


def test_resize_to_full_rank_is_lossless_and_lower_ranks_report_a_direct_svds_energy(tmp_path, loras):
    base, a, _ = loras
    run_recipe_here(
        "lora_resize",
        f"model.path={base}",
        f"checkpoint={a}",
        "resize.rank=4",
        "export.formats=[diffusers]",
        f"output_dir={tmp_path / 'full'}",
        "sample.prompts=[]",
    )
    exact = deltas(base, a)
    full = deltas(base, tmp_path / "full" / "diffusers" / "pytorch_lora_weights.safetensors")
    for name, d in exact.items():
        torch.testing.assert_close(full[name], d, atol=1e-5, rtol=1e-4)
    run_recipe_here(
        "lora_resize",
        f"model.path={base}",
        f"checkpoint={a}",
        "resize.rank=2",
        "export.formats=[kohya]",
        f"output_dir={tmp_path / 'two'}",
        *SAMPLE,
    )
    rows = json.loads((tmp_path / "two" / "resize.json").read_text())["modules"]
    assert len(rows) == len(exact)
    for row in rows:
        s = torch.linalg.svdvals(exact[row["module"]].flatten(1).double())
        assert row["rank"] == 2 and row["rank_before"] == 4
        assert row["energy"] == pytest.approx(float((s[:2] ** 2).sum() / (s**2).sum()), abs=2e-6)
    kohya = load_file(next((tmp_path / "two" / "kohya").glob("*.safetensors")))
    assert {v.shape[0] for k, v in kohya.items() if k.endswith("lora_down.weight")} == {2}
    assert (tmp_path / "two" / "gallery" / "grid.png").is_file()


# ---------------------------------------------------------------- extract


def test_extract_recovers_a_known_low_rank_difference_and_only_the_changed_modules(tmp_path, tiny):
    """A tuned model made by hand: rank-3 differences on a few modules (an attention projection, a resnet
    convolution, a text-encoder projection), a changed bias; everything else the base's."""
    from diffusers import StableDiffusionPipeline

    base = tiny("sd15")
    pipe = StableDiffusionPipeline.from_pretrained(base)
    torch.manual_seed(3)
    known = {
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": None,
        "unet.up_blocks.1.resnets.0.conv1": None,
        # (diffusers reads a kohya text-encoder LoRA only with out_proj in it)
        "text_encoder.encoder.layers.0.self_attn.out_proj": None,
    }
    with torch.no_grad():
        for name in known:
            component, _, inner = name.partition(".")
            weight = getattr(pipe, component).get_submodule(inner).weight
            factors = Factors(
                torch.randn(3, *weight.shape[1:]) * 0.3,
                torch.randn(weight.shape[0], 3, *([1] * (weight.dim() - 2))) * 0.3,
            )
            known[name] = factors.delta()
            weight += known[name]
        pipe.unet.conv_out.bias += 0.1  # a change no LoRA holds
    pipe.save_pretrained(tmp_path / "tuned")
    run_recipe_here(
        "lora_extract", f"model.path={base}", f"extract.tuned={tmp_path / 'tuned'}", "extract.rank=3",
        "export.formats=[diffusers,kohya]", f"output_dir={tmp_path / 'x'}", *SAMPLE,
    )  # fmt: skip
    got = deltas(base, tmp_path / "x" / "diffusers" / "pytorch_lora_weights.safetensors")
    assert set(got) == set(known)
    for name, delta in known.items():
        assert (got[name] - delta).abs().max() < 1e-4, name
    report = json.loads((tmp_path / "x" / "extract.json").read_text())
    assert report["modules"][0]["rank_before"] == 3
    assert {"tensor": "unet.conv_out.bias"}.items() <= next(r for r in report["modules"] if "tensor" in r).items()
    assert report["changed_but_not_held"] == 1
    assert (tmp_path / "x" / "gallery" / "grid.png").is_file()
    # the kohya file draws what the diffusers file draws
    kohya = next((tmp_path / "x" / "kohya").glob("*.safetensors"))
    torch.testing.assert_close(
        draw(pipeline(base, [(kohya, 1.0)])),
        draw(pipeline(base, [(tmp_path / "x" / "diffusers" / "pytorch_lora_weights.safetensors", 1.0)])),
        atol=1e-5,
        rtol=0,
    )


@pytest.mark.e2e
def test_extract_by_energy_picks_each_modules_rank_and_skips_tiny_changes(tmp_path, tiny):
    from diffusers import StableDiffusionPipeline

    base = tiny("sd15")
    pipe = StableDiffusionPipeline.from_pretrained(base)
    torch.manual_seed(4)
    big = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k"
    tiny_change = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_v"
    with torch.no_grad():
        w = pipe.unet.get_submodule(big).weight
        u, _, vh = torch.linalg.svd(torch.randn_like(w))
        spectrum = torch.tensor([4.0, 2.0, 1.0] + [0.01] * (min(w.shape) - 3))
        w += (u[:, : len(spectrum)] * spectrum) @ vh[: len(spectrum)]
        pipe.unet.get_submodule(tiny_change).weight.mul_(1 + 1e-6)
    pipe.save_pretrained(tmp_path / "tuned")
    run_recipe_here(
        "lora_extract", f"model.path={base}", f"extract.tuned={tmp_path / 'tuned'}", "extract.energy=0.95",
        "extract.rank=16", "export.formats=[diffusers]", f"output_dir={tmp_path / 'x'}", "sample.prompts=[]",
    )  # fmt: skip
    report = json.loads((tmp_path / "x" / "extract.json").read_text())
    rows = {r["module"]: r for r in report["modules"] if "module" in r}
    power = spectrum**2
    needed = int((torch.cumsum(power, 0) / power.sum() < 0.95).sum()) + 1
    assert rows[f"unet.{big}"]["rank"] == needed == 2
    assert rows[f"unet.{tiny_change}"]["skipped"] == "below extract.threshold"
    assert report["skipped"] == 1 and report["modules"][0]["module"] == f"unet.{big}"


# ---------------------------------------------------------------- inspect


@pytest.mark.e2e
def test_inspect_reads_format_family_ranks_alphas_triggers_and_what_a_base_would_not_load(tmp_path, loras):
    base, a, b = loras
    alone = tmp_path / "a.safetensors"  # outside its run folder, whose base it would otherwise bring
    alone.write_bytes(a.read_bytes())
    run_recipe_here("inspect", f"checkpoint={alone}", f"output_dir={tmp_path / 'i'}")
    report = json.loads((tmp_path / "i" / "inspect.json").read_text())
    assert report["format"] == "kohya" and report["kind"] == "lora"
    assert "sd15" in report["families"]
    assert report["ranks"] == {"4": len(report["modules"])} and report["alphas"] == {"2": len(report["modules"])}
    assert "base" not in report and not (tmp_path / "i" / "gallery").exists()
    run_recipe_here("inspect", f"checkpoint={b}", f"model.path={base}", f"output_dir={tmp_path / 'j'}", *SAMPLE)
    report = json.loads((tmp_path / "j" / "inspect.json").read_text())
    assert report["format"] == "diffusers" and report["alphas"] == {"6": len(report["modules"])}
    assert report["not_loading"] == {
        "modules": len(report["modules"]),
        "landed": len(report["modules"]),
        "keys": [],
        "error": None,
    }
    assert (tmp_path / "j" / "gallery" / "grid.png").is_file() and "diffusers (lora)" in (
        tmp_path / "j" / "README.md"
    ).read_text()
    # a file with a module the base lacks: named
    state = load_file(b)
    with safe_open(b, "pt") as f:
        meta = f.metadata()
    state["unet.down_blocks.9.attentions.0.proj_in.lora_A.weight"] = torch.zeros(3, 16)
    state["unet.down_blocks.9.attentions.0.proj_in.lora_B.weight"] = torch.zeros(16, 3)
    save_file(state, tmp_path / "stray.safetensors", meta)
    run_recipe_here(
        "inspect",
        f"checkpoint={tmp_path / 'stray.safetensors'}",
        f"model.path={base}",
        f"output_dir={tmp_path / 'k'}",
        "sample.prompts=[]",
    )
    report = json.loads((tmp_path / "k" / "inspect.json").read_text())
    n = report["not_loading"]
    assert n["landed"] == n["modules"] - 1 and any("down_blocks.9" in k for k in n["keys"]), n


# ---------------------------------------------------------------- refusals


def _fake(path: Path, keys: dict[str, tuple[int, ...]]) -> Path:
    save_file({k: torch.zeros(shape) for k, shape in keys.items()}, path)
    return path


@pytest.mark.parametrize(
    "keys,said",
    [
        ({"model.diffusion_model.input_blocks.0.0.weight": (8, 4, 3, 3)}, "no LoRA, LoHa or LoKr keys"),
        ({"lora_unet_mid_block_attentions_0_proj_in.lora_down.weight": (4, 16),
          "lora_unet_mid_block_attentions_0_proj_in.lora_up.weight": (16, 3)}, "do not form a LoRA"),
        ({"lora_unet_mid_block_attentions_0_proj_in.lora_down.weight": (4, 16),
          "lora_unet_mid_block_attentions_0_proj_in.lora_up.weight": (16, 4),
          "mystery.mid_block.lora_A.weight": (4, 16),
          "mystery.mid_block.lora_B.weight": (16, 4)}, "an unknown adapter format"),
        ({"lora_unet_mid_block_attentions_0_proj_in.lora_down.weight": (4, 16)}, "has no matching up weight"),
    ],
)  # fmt: skip
@pytest.mark.parametrize("recipe", ["lora_merge", "lora_resize"])
def test_bad_inputs_are_refused_by_name_before_anything_is_written(tmp_path, tiny, keys, said, recipe, capsys):
    """Through the command line's own path (compose, check, run): exit code 2, the file and the fault named,
    no run folder."""
    from tuner.__main__ import main

    bad = _fake(tmp_path / "bad.safetensors", keys)
    where = (
        ["merge.inputs=[{path: " + str(bad) + "}]"]
        if recipe == "lora_merge"
        else [f"checkpoint={bad}", "resize.rank=2"]
    )
    assert main([f"recipe={recipe}", f"model.path={tiny('sd15')}", f"output_dir={tmp_path / 'out'}", *where]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and said in err
    assert not (tmp_path / "out").exists()


def _sample_file(path: Path, modules: dict[str, tuple[int, int]]) -> Path:
    """A LoRA file of zeros with a family's ``SAMPLE_FILES`` modules: kohya's factor names for ``lora_`` keys,
    peft's for the rest."""
    state = {}
    for name, (rank, width) in modules.items():
        kohya = name.startswith("lora_")
        down, up = (".lora_down.weight", ".lora_up.weight") if kohya else (".lora_A.weight", ".lora_B.weight")
        state |= {name + down: torch.zeros(rank, width), name + up: torch.zeros(8, rank)}
    save_file(state, path)
    return path


SAMPLES = [pytest.param(name, i, id=f"{name}-{i}") for name in family_names()
           for i in range(len(get_family(name).SAMPLE_FILES))]  # fmt: skip


@pytest.mark.parametrize("family,which", SAMPLES)
def test_the_family_of_a_real_width_file_is_named_from_its_header(tmp_path, family, which):
    """Each family's sample files (its real widths, each key style its clients write) name it, and only it (and the
    families whose adapter files are the same files: Flux.1 Kontext's transformer is Flux.1 dev's)."""
    from tuner.export.inspection import describe

    files = get_family(family).SAMPLE_FILES
    described = describe(_sample_file(tmp_path / "lora.safetensors", files[which]))
    twins = tuple(name for name in family_names() if get_family(name).SAMPLE_FILES == files)
    assert described.families == twins and family in twins, described.evidence


@pytest.mark.parametrize("other", family_names()[1:])
def test_another_familys_lora_is_refused_by_name_as_a_merge_input(tmp_path, tiny, other, capsys):
    """A real-width LoRA of another family, merged onto the first family's base: exit 2 before anything is
    written, naming the file and the family it was made for."""
    from tuner.__main__ import main

    bad = _sample_file(tmp_path / "other.safetensors", get_family(other).SAMPLE_FILES[0])
    first = family_names()[0]
    args = ["recipe=lora_merge", f"model={first}", f"model.path={tiny(first)}", f"output_dir={tmp_path / 'out'}"]
    assert main([*args, "merge.inputs=[{path: " + str(bad) + "}]"]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and other in err
    assert not (tmp_path / "out").exists()


def test_a_pickle_and_an_embedding_are_refused_as_merge_inputs(tmp_path, tiny):
    from tuner.checks import validate
    from tuner.compose import compose

    pickled = tmp_path / "lora.safetensors"
    torch.save({"lora_unet_x.lora_down.weight": torch.zeros(2, 2)}, pickled)
    embedding = _fake(tmp_path / "emb.safetensors", {"emb_params": (1, 32)})
    for path, said in ((pickled, "a pickle file, refused"), (embedding, "an embedding")):
        cfg = compose(
            "lora_merge",
            [f"model.path={tiny('sd15')}", f"merge.inputs=[{{path: {path}}}]", f"output_dir={tmp_path / 'o'}"],
        )
        with pytest.raises(ConfigError, match=said):
            validate(cfg)
    cfg = compose("lora_resize", [f"model.path={tiny('sd15')}", f"checkpoint={embedding}", "resize.rank=2"])
    with pytest.raises(ConfigError, match="an embedding"):
        validate(cfg)
    cfg = compose("lora_resize", [f"model.path={tiny('sd15')}", f"checkpoint={embedding}"])
    with pytest.raises(ConfigError, match="resize.rank=R"):
        validate(cfg)


def test_a_safetensors_file_whose_header_length_starts_with_0x80_is_read_not_refused_as_a_pickle(tmp_path):
    """A safetensors file begins with its header's length, 8 bytes little-endian: one of 256 has 0x80 first,
    the byte a pickle starts with. Such a file (tuner's own SDXL kohya export, once) must load."""
    from tuner.export.reading import is_pickle, read_tensors

    for extra in range(300):  # metadata of growing length until the header's length ends in 0x80
        path = tmp_path / "lora.safetensors"
        save_file({"lora_unet_x.lora_down.weight": torch.zeros(2, 4)}, path, {"pad": "x" * extra})
        if path.read_bytes()[0] == 0x80:
            break
    assert path.read_bytes()[0] == 0x80
    assert not is_pickle(path)
    assert list(read_tensors(path)[0]) == ["lora_unet_x.lora_down.weight"]
    torch.save({"a": torch.zeros(1)}, tmp_path / "p.safetensors", _use_new_zipfile_serialization=False)
    assert is_pickle(tmp_path / "p.safetensors")  # a bare pickle stream (0x80, then its protocol) still is one


@pytest.mark.e2e
def test_the_toolbox_from_the_command_line_on_trained_runs(tmp_path, tiny):
    """As a user: two trained runs merged by their folders (the base comes from the first run), inspected,
    resized by energy; a bad call refused with its key and exit code 2."""
    from tests.helpers import run_tuner, train_in_process

    base = tiny("sd15")
    for name, seed in (("one", 0), ("two", 1)):
        train_in_process(
            tmp_path, base, f"seed={seed}", "text_encoder.train=lora", "export.formats=[diffusers,kohya]", name=name
        )
    home = tmp_path / "home"
    merged = run_tuner(
        "recipe=lora_merge",
        f"merge.inputs=[{{path: {tmp_path / 'one'}, weight: 1.0}}, {{path: {tmp_path / 'two'}, weight: 0.7}}]",
        f"output_dir={tmp_path / 'merged'}", "sample.seeds=[0,1]", "sample.steps=3", home=home, cwd=tmp_path,
    )  # fmt: skip
    assert merged.returncode == 0, merged.stdout[-2000:] + merged.stderr[-2000:]
    assert "merge: 52 modules (exactly, their ranks stacked)" in merged.stdout
    out = tmp_path / "merged"
    assert (out / "gallery" / "grid.png").is_file() and "## How it was made" in (out / "README.md").read_text()
    kohya = out / "kohya" / "merged.safetensors"
    with safe_open(kohya, "pt") as f:
        assert f.metadata()["modelspec.trigger_phrase"] == PROMPT
        assert {f.get_slice(k).get_shape()[0] for k in f.keys() if k.endswith("lora_down.weight")} == {16}  # 8 + 8
    inspected = run_tuner(
        "recipe=inspect", f"checkpoint={kohya}", f"output_dir={tmp_path / 'i'}", home=home, cwd=tmp_path
    )
    assert inspected.returncode == 0, inspected.stderr[-2000:]
    assert "format       kohya (lora)" in inspected.stdout and "52 of 52 modules load" in inspected.stdout
    resized = run_tuner(
        "recipe=lora_resize", f"checkpoint={out}", "resize.energy=0.9", f"output_dir={tmp_path / 'r'}",
        "sample.seeds=[0]",
        "sample.steps=3", home=home, cwd=tmp_path,
    )  # fmt: skip
    assert resized.returncode == 0, resized.stderr[-2000:]
    report = json.loads((tmp_path / "r" / "resize.json").read_text())
    assert report["energy"]["min"] >= 0.9 and report["rank"]["max"] <= 16
    refused = run_tuner(
        "recipe=lora_merge", f"model.path={base}", f"output_dir={tmp_path / 'x'}", home=home, cwd=tmp_path
    )
    assert refused.returncode == 2 and "merge.inputs is empty" in refused.stderr and not (tmp_path / "x").exists()


@pytest.mark.parametrize("other", family_names()[1:])  # beside the first family's base
def test_extract_refuses_a_fine_tune_of_another_model_before_anything_loads(tmp_path, tiny, other):
    """A fine-tune of another family (another pipeline class) or of another model of the same pipeline class (other
    widths) is refused by extract.tuned's name when the config is checked."""
    from tuner.checks import validate
    from tuner.compose import compose

    cfg = compose("lora_extract", [f"model.path={tiny('sd15')}", f"extract.tuned={tiny(other)}"])
    with pytest.raises(ConfigError, match=r"extract\.tuned"):
        validate(cfg)


def test_an_sd3_kohya_file_is_refused_as_an_input_naming_the_exports_diffusers_reads(tmp_path, tiny):
    """diffusers has no reader of SD3 kohya files (ComfyUI's): refused when the config is checked, not after
    the base loads."""
    from tuner.checks import validate
    from tuner.compose import compose

    name = "lora_unet_joint_blocks_0_x_block_attn_qkv"
    bad = _fake(tmp_path / "sd3.safetensors", {f"{name}.lora_down.weight": (4, 32), f"{name}.lora_up.weight": (96, 4)})
    cfg = compose("lora_resize", ["model=sd3", f"model.path={tiny('sd3')}", f"checkpoint={bad}", "resize.rank=2"])
    with pytest.raises(ConfigError, match="diffusers cannot load"):
        validate(cfg)
