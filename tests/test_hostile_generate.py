"""Hostile inputs to generate and the LoRA toolbox (issue #35): a step callback from where it should not come, a
Ctrl-C while drawing, sizes too large to draw, a refiner whose parts do not fit its pipeline, and a LoRA made for
another model. Each gets one ``tuner:`` line and its exit code; a refusal made when the config is checked leaves
no run folder, and no file of the user's changes (sha256 of the folders before and after).
"""

import json
import re
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from tests.helpers import ROOT
from tests.test_hostile_files import cli, generate_args, one_line, tree

pytestmark = pytest.mark.hostile  # the hostile-input corpus: pytest -m hostile

SIDE_EFFECT = "import pathlib\npathlib.Path({marker!r}).write_text('imported')\n"


def callback_file(folder: Path, body: str, name: str = "hook.py", marker: Path | None = None) -> Path:
    """A user's callback file; with ``marker``, importing it writes that file (what a refusal must not do)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text((SIDE_EFFECT.format(marker=str(marker)) if marker else "") + body)
    return path


GOOD_HOOK = "def hook(pipe, step, timestep, callback_kwargs):\n    return callback_kwargs\n"


# ---------------------------------------------------------------- generate.callback


def test_a_callback_module_in_the_current_folder_is_refused_and_never_imported(
    capsys, tiny_pipeline_dir, tmp_path, monkeypatch
):
    """``generate.callback=sidefx.hook`` with sidefx.py where the command runs (and, as ``python -m`` puts it,
    that folder first on sys.path): refused by name, nothing of the file ran, no run folder."""
    work = tmp_path / "work"
    marker = tmp_path / "imported.txt"
    callback_file(work, GOOD_HOOK, "sidefx.py", marker)
    monkeypatch.chdir(work)
    monkeypatch.syspath_prepend(str(work))
    before = tree(work)
    code, err = cli(capsys, *generate_args(tiny_pipeline_dir, "generate.callback=sidefx.hook",
                                           f"output_dir={tmp_path / 'out'}"))  # fmt: skip
    line = one_line(err)
    assert code == 2 and "generate.callback=sidefx.hook" in line and "current folder" in line, line
    assert not marker.exists() and "sidefx" not in sys.modules
    assert not (tmp_path / "out").exists() and tree(work) == before


def test_a_callback_set_by_a_recipe_preset_is_refused_and_its_file_never_runs(
    capsys, tiny_pipeline_dir, tmp_path, monkeypatch
):
    """A preset (or a config copied into recipes/) that names a callback file: refused, the file not run; the key
    is taken from the command line only."""
    import tuner.compose

    marker = tmp_path / "imported.txt"
    hook = callback_file(tmp_path / "theirs", GOOD_HOOK, marker=marker)
    recipes = tmp_path / "recipes"
    recipes.mkdir()
    preset = (ROOT / "recipes" / "generate.yaml").read_text() + f"generate:\n  callback: {hook}:hook\n"
    (recipes / "shared.yaml").write_text(preset)
    monkeypatch.setattr(tuner.compose, "RECIPES_DIR", recipes)
    before = tree(tmp_path / "theirs")
    args = generate_args(tiny_pipeline_dir, f"output_dir={tmp_path / 'out'}")
    code, err = cli(capsys, "recipe=shared", *args[1:])
    line = one_line(err)
    assert code == 2 and f"generate.callback={hook}:hook" in line and "command line" in line, line
    assert "recipes/shared.yaml" in line
    assert not marker.exists() and not (tmp_path / "out").exists() and tree(tmp_path / "theirs") == before


@pytest.mark.parametrize(
    "value, said",
    [
        ("{file}:hook", "takes (pipe, step)"),  # a file of the user's, the wrong signature
        ("{file}:nothing", "no function nothing"),
        ("json.dumps", "must accept (pipe, step, timestep, callback_kwargs)"),  # installed, but not a step callback
        ("no_such_package_here.hook", "no installed module no_such_package_here"),
    ],
)
def test_a_callback_that_cannot_be_called_as_a_step_callback_is_refused_before_anything_loads(
    capsys, tiny_pipeline_dir, tmp_path, value, said
):
    file = callback_file(tmp_path / "mine", "def hook(pipe, step):\n    return None\n")
    value = value.format(file=file)
    before = tree(tmp_path / "mine")
    code, err = cli(capsys, *generate_args(tiny_pipeline_dir, f"generate.callback={value}",
                                           f"output_dir={tmp_path / 'out'}"))  # fmt: skip
    line = one_line(err)
    assert code == 2 and f"generate.callback={value}" in line and said in line, line
    assert not (tmp_path / "out").exists() and tree(tmp_path / "mine") == before


# ---------------------------------------------------------------- Ctrl-C


def test_ctrl_c_while_drawing_ends_in_one_line_and_the_index_lists_the_images_made(capsys, tiny_pipeline_dir, tmp_path):
    """A KeyboardInterrupt at the 5th denoising step (2 steps an image, one image a batch): images 0 and 1 are
    made, the third is not; exit 130 with one line, images.jsonl and index.html list exactly the two made."""
    body = (
        "CALLS = []\n\n\ndef hook(pipe, step, timestep, callback_kwargs):\n    CALLS.append(step)\n"
        "    if len(CALLS) == 5:\n        raise KeyboardInterrupt\n    return callback_kwargs\n"
    )
    hook = callback_file(tmp_path / "mine", body)
    before = tree(tmp_path / "mine")
    out = tmp_path / "out"
    code, err = cli(capsys, *generate_args(tiny_pipeline_dir, f"generate.callback={hook}:hook", "generate.batch_size=1",
                                           "generate.images_per_prompt=4", f"output_dir={out}"))  # fmt: skip
    line = one_line(err)
    assert code == 130 and "interrupted" in line and "2 of 4 images" in line, err
    listed = [json.loads(x)["file"] for x in (out / "images" / "images.jsonl").read_text().splitlines()]
    assert listed == ["0000-seed0.png", "0001-seed1.png"]
    assert sorted(p.name for p in (out / "images").glob("*.png")) == listed
    page = (out / "images" / "index.html").read_text()
    assert all(f'src="{name}"' in page for name in listed) and "0002-seed2.png" not in page
    assert tree(tmp_path / "mine") == before


# ---------------------------------------------------------------- sizes


@pytest.mark.parametrize(
    "override, said",
    [
        ("generate.width=100000", "generate.width=100000"),
        ("generate.height=800000", "generate.height=800000"),
        ("generate.width=8200", "generate.width=8200"),
        ("PROMPT_FILE", "prompts.txt:1: width and height 100000x16"),  # a prompt line's --w
    ],
)
def test_a_size_too_large_to_draw_is_refused_naming_the_key(capsys, tiny_pipeline_dir, tmp_path, override, said):
    prompts = tmp_path / "mine" / "prompts.txt"
    prompts.parent.mkdir()
    prompts.write_text("a ball --w 100000 --h 16\n")
    if override == "PROMPT_FILE":
        override = f"generate.prompt_file={prompts}"
    before = tree(prompts.parent)
    code, err = cli(capsys, *generate_args(tiny_pipeline_dir, override, f"output_dir={tmp_path / 'out'}"))
    line = one_line(err)
    assert code == 2 and said in line and "8192" in line, line
    assert not (tmp_path / "out").exists() and tree(prompts.parent) == before


def test_the_largest_size_still_validates(tiny_pipeline_dir, tmp_path):
    """The positive control: 8192 a side passes the checks (drawing it is the user's call)."""
    from tuner.checks import validate
    from tuner.compose import compose

    args = generate_args(tiny_pipeline_dir, "generate.width=8192", "generate.height=8192", f"output_dir={tmp_path}/o")
    validate(compose("generate", list(args[1:])))
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------- the refiner


REFINER_INDEX = {
    "_class_name": "StableDiffusionXLImg2ImgPipeline",
    "scheduler": ["diffusers", "EulerDiscreteScheduler"],
    "text_encoder": [None, None],
    "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
    "tokenizer": [None, None],
    "tokenizer_2": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}


@pytest.mark.parametrize(
    "change, said",
    [
        ({"vae": None}, "has no vae"),
        ({"text_encoder_2": [None, None]}, "has no text_encoder_2"),
        ({"unet": ["diffusers", "SD3Transformer2DModel"]}, "its unet is SD3Transformer2DModel"),
        ({"scheduler": ["diffusers", "AutoencoderKL"]}, "its scheduler is AutoencoderKL"),
        ({"folder": "unet"}, "no unet/ folder"),
        ({}, None),  # the positive control: this folder passes
    ],
)
def test_a_refiner_whose_parts_do_not_fit_its_pipeline_is_refused_naming_the_part(capsys, tiny, tmp_path, change, said):
    base = tiny("sdxl")
    refiner = tmp_path / "refiner"
    index = {k: v for k, v in {**REFINER_INDEX, **change}.items() if v is not None and k != "folder"}
    for name in REFINER_INDEX:
        if name != "_class_name" and name != change.get("folder"):
            (refiner / name).mkdir(parents=True)
    (refiner / "model_index.json").write_text(json.dumps(index))
    before = {"refiner": tree(refiner), "base": tree(base)}
    args = ["recipe=generate", "model=sdxl", f"model.path={base}", "generate.prompts=[a ball]", "generate.steps=2",
            f"generate.refiner={refiner}", f"output_dir={tmp_path / 'out'}"]  # fmt: skip
    if said is None:
        from tuner.checks import validate
        from tuner.compose import compose

        validate(compose("generate", args[1:]))
    else:
        code, err = cli(capsys, *args)
        line = one_line(err)
        assert code == 2 and f"generate.refiner={refiner}" in line and said in line, line
    assert not (tmp_path / "out").exists() and {"refiner": tree(refiner), "base": tree(base)} == before


# ---------------------------------------------------------------- a LoRA made for another model


@pytest.fixture(scope="module")
def sdxl_lora(tiny, tmp_path_factory) -> Path:
    """A LoRA in diffusers' keys on the tiny SDXL U-Net's cross-attention (its width 40 is the SDXL text width):
    names any U-Net family may have, so only its shapes say it is not for the tiny SD1.5."""
    with safe_open(tiny("sdxl") / "unet" / "diffusion_pytorch_model.safetensors", "pt") as f:
        shapes = {k.removesuffix(".weight"): f.get_slice(k).get_shape() for k in f.keys()}
    state = {}
    for name, (out, width) in ((k, s) for k, s in shapes.items() if re.search(r"attn2\.to_[kv]$", k)):
        state[f"unet.{name}.lora_A.weight"] = torch.randn(2, width) * 0.01
        state[f"unet.{name}.lora_B.weight"] = torch.randn(out, 2) * 0.01
    folder = tmp_path_factory.mktemp("theirs")
    save_file(state, folder / "sdxl_lora.safetensors")
    return folder / "sdxl_lora.safetensors"


@pytest.mark.parametrize("recipe", ["lora_merge", "generate"])
def test_a_lora_of_another_model_is_refused_naming_its_first_misfit_and_both_shapes(
    capsys, tiny, sdxl_lora, tmp_path, recipe
):
    base = tiny("sd15")
    if recipe == "lora_merge":
        args = ["recipe=lora_merge", f"model.path={base}", "merge.inputs=[{path: " + str(sdxl_lora) + "}]"]
        key = "merge.inputs[0]"
    else:
        args, key = generate_args(base, f"generate.adapters=[{{path:{sdxl_lora}}}]"), "generate.adapters[0]"
    before = {"lora": tree(sdxl_lora.parent), "base": tree(base)}
    code, err = cli(capsys, *args, f"output_dir={tmp_path / 'out'}")
    line = one_line(err)
    assert code == 2 and line.startswith(f"tuner: config error: {key}: {sdxl_lora}"), line
    found = re.search(
        r"its module unet\.(\S+) changes a weight of shape \((\d+), (\d+)\).* has (\S+) of shape (\(.*?\))", line
    )
    assert found, line
    module, out, width, base_key, base_shape = found.groups()
    with safe_open(sdxl_lora, "pt") as f:
        assert f.get_slice(f"unet.{module}.lora_A.weight").get_shape()[1] == int(width)
        assert f.get_slice(f"unet.{module}.lora_B.weight").get_shape()[0] == int(out)
    with safe_open(base / "unet" / "diffusion_pytorch_model.safetensors", "pt") as f:
        assert base_key == f"{module}.weight" and base_shape == str(tuple(f.get_slice(base_key).get_shape()))
    assert not (tmp_path / "out").exists()
    assert {"lora": tree(sdxl_lora.parent), "base": tree(base)} == before


def test_a_lora_of_this_model_still_passes_the_check(tiny, tmp_path):
    """The positive control: the same kind of file made on the tiny SD1.5 itself passes merge's checks."""
    from tuner.checks import validate
    from tuner.compose import compose

    base = tiny("sd15")
    with safe_open(base / "unet" / "diffusion_pytorch_model.safetensors", "pt") as f:
        shapes = {k.removesuffix(".weight"): f.get_slice(k).get_shape() for k in f.keys()}
    state = {}
    for name, (out, width) in ((k, s) for k, s in shapes.items() if re.search(r"attn2\.to_[kv]$", k)):
        state[f"unet.{name}.lora_A.weight"] = torch.zeros(2, width)
        state[f"unet.{name}.lora_B.weight"] = torch.zeros(out, 2)
    save_file(state, tmp_path / "own.safetensors")
    inputs = "merge.inputs=[{path: " + str(tmp_path / "own.safetensors") + "}]"
    validate(compose("lora_merge", [f"model.path={base}", inputs, f"output_dir={tmp_path / 'out'}"]))
    assert not (tmp_path / "out").exists()
