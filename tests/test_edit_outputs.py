"""What an edit run shows (issue #39), on a tiny Flux.1 Kontext of diffusers' real classes: an edit tuner samples is
the pipeline's own edit of the control at the seed; the gallery's and the validation page's rows are control(s) |
base | fine-tuned | target; ``recipe=generate generate.controls=[...]`` edits, and is refused where it cannot."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers import PROMPT, tiny_family
from tuner.errors import ConfigError
from tuner.export.gallery import LABEL_WIDTH, PAD, write_edit_gallery
from tuner.export.validation import ValidationGallery
from tuner.models import register, unregister
from tuner.models.flux_kontext import FluxKontext
from tuner.sampling import Pair, sample_edits

LENGTH = 32  # the tiny T5's prompt length


@pytest.fixture(scope="module")
def kontext(tmp_path_factory):
    """(family with control_auto_resize=false, its components, its pipeline, the folder)."""
    register(FluxKontext)
    try:
        yield tiny_family(tmp_path_factory, FluxKontext.NAME, max_sequence_length=LENGTH, control_auto_resize=False)
    finally:
        unregister(FluxKontext.NAME)


def photo(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def test_an_edit_is_the_pipelines_own_edit_of_the_control_at_the_seed(kontext):
    """``sample_edits`` draws each pair once for all seeds at its target's size; each image is what the family's
    pipeline draws for that control, prompt and seed alone (the control of another size than the target's)."""
    family, _, pipe, _ = kontext
    control, target = photo(48, 32), photo(32, 48, seed=1)  # (width, height)
    pair = Pair(PROMPT, [control], target)
    ours = sample_edits(pipe, family.REFERENCES, [pair], [0, 3], 16, steps=2, guidance_scale=3.0,
                        decode=family.decode, guidance=family.guidance_kwargs, **family.call_kwargs())  # fmt: skip
    assert len(ours) == 1 and ours[0].shape == (2, 3, 48, 32)
    for k, seed in enumerate([0, 3]):
        theirs = pipe(
            prompt=PROMPT, image=control, height=48, width=32, max_area=48 * 32, _auto_resize=False,
            num_inference_steps=2, guidance_scale=3.0, max_sequence_length=LENGTH,
            generator=torch.Generator().manual_seed(seed), output_type="pt",
        ).images[0]  # fmt: skip
        torch.testing.assert_close((ours[0][k] + 1) / 2, theirs.clamp(0, 1), rtol=0, atol=2e-3)
    plain = sample_edits(pipe, family.REFERENCES, [Pair(PROMPT, [photo(48, 32, seed=5)], target)], [0], 16, steps=2,
                         decode=family.decode, guidance=family.guidance_kwargs, **family.call_kwargs())  # fmt: skip
    assert (plain[0][0] - ours[0][0]).abs().max() > 1e-3  # the control is read


def edits(n: int, h: int, w: int, shift: float) -> torch.Tensor:
    return torch.linspace(-1, 1, n * 3 * h * w).reshape(n, 3, h, w) * 0.5 + shift


def test_the_gallery_row_of_a_pair_is_controls_base_fine_tuned_target(tmp_path):
    """One row per pair, columns control(s) | base at each seed | fine-tuned at each seed | target; a pair with fewer
    controls leaves its cell blank; controls larger than the edits are shown at their size, aspect kept."""
    seeds = [0, 1]
    rows = [
        (
            "a.png: make it red",
            [photo(40, 20), photo(16, 16)],
            edits(2, 16, 16, 0),
            edits(2, 16, 16, 0.3),
            photo(16, 16),
        ),
        ("b.png: make it blue", [photo(300, 100)], edits(2, 16, 24, -0.3), edits(2, 16, 24, 0.1), None),
    ]
    grid = Image.open(write_edit_gallery(tmp_path, rows, seeds, display_size=32))
    page = (tmp_path / "index.html").read_text()
    heads = ["control 1", "control 2", "base, seed 0", "base, seed 1", "fine-tuned, seed 0", "fine-tuned, seed 1",
             "target"]  # fmt: skip
    assert [page.index(f"<th>{h}</th>") for h in heads] == sorted(page.index(f"<th>{h}</th>") for h in heads)
    cells = tmp_path / "cells"
    assert {p.name for p in cells.iterdir()} == {
        "row0_control0.png", "row0_control1.png", "row0_base_seed0.png", "row0_base_seed1.png",
        "row0_tuned_seed0.png", "row0_tuned_seed1.png", "row0_target.png",
        "row1_control0.png", "row1_base_seed0.png", "row1_base_seed1.png", "row1_tuned_seed0.png",
        "row1_tuned_seed1.png",
    }  # fmt: skip
    assert Image.open(cells / "row1_control0.png").size == (48, 16)  # thumbnailed to the edits' side, 3:1 kept
    assert Image.open(cells / "row1_tuned_seed0.png").size == (48, 32)  # 16 x 24 upscaled x2 to display 32
    tuned = np.asarray(Image.open(cells / "row0_tuned_seed1.png"), dtype=np.float32)[::2, ::2]
    expected = ((edits(2, 16, 16, 0.3)[1].clamp(-1, 1) + 1) * 127.5).permute(1, 2, 0).numpy()
    assert np.abs(tuned - expected).max() <= 1
    cell_w = 48  # the widest cell
    assert grid.size[0] == LABEL_WIDTH + 7 * (cell_w + PAD)
    assert page.index("row0_control0.png") < page.index("row0_base_seed0.png") < page.index("row0_tuned_seed0.png")
    assert page.index("row0_tuned_seed1.png") < page.index("row0_target.png") < page.index("row1_control0.png")


def test_the_validation_page_of_an_edit_run_shows_each_pair_beside_the_base_and_each_step(tmp_path):
    """Each pair's control(s) and target head its columns; step 0 is the base's edit; a later step's grid has the
    base's edits beside the step's, between the controls and the target; the record resumes as a prompt page's."""
    pairs = [Pair("make it red", [photo(24, 16)], photo(16, 16), "a.png"), Pair("blue", [photo(16, 16)], None, "b.png")]
    labels = ["a.png: make it red", "b.png: blue"]
    seeds = [0, 1]
    page = ValidationGallery(tmp_path, labels, seeds, 16, pairs)
    assert not (tmp_path / "pairs").exists()  # rank 0 writes them with its first step
    page.add(0, [edits(2, 16, 16, 0), edits(2, 16, 16, 0.1)], {"val_loss": 0.5})
    grid = Image.open(page.add(2, [edits(2, 16, 16, 0.4), edits(2, 16, 16, 0.5)], {"val_loss": 0.4}))
    assert sorted(p.name for p in (tmp_path / "pairs").iterdir()) == [
        "p0_control0.png",
        "p0_target.png",
        "p1_control0.png",
    ]
    html = (tmp_path / "index.html").read_text()
    assert "<th>0 (base)</th>" in html and "<th>2</th>" in html
    refs = html.index("control(s) &rarr; target")
    assert refs < html.index("pairs/p0_control0.png") < html.index("pairs/p0_target.png") < html.index("<th>0 (base)")
    # control | base s0 s1 | step s0 s1 | target, the cells 16 px
    assert grid.size == (LABEL_WIDTH + 6 * (16 + PAD), 32 + 2 * (16 + PAD))  # heads of two lines: "base\nseed 0"
    base_cell = np.asarray(grid)[32 : 32 + 16, LABEL_WIDTH + (16 + PAD) : LABEL_WIDTH + (16 + PAD) + 16]
    assert np.array_equal(base_cell, np.asarray(Image.open(tmp_path / "cells" / "step_000000_p0_s0.png")))
    record = json.loads((tmp_path / "steps.json").read_text())
    assert [s["step"] for s in record["steps"]] == [0, 2] and record["prompts"] == labels
    assert ValidationGallery(tmp_path, labels, seeds, 16, pairs).steps == [0, 2]  # a resumed run continues it
    with pytest.raises(ValueError, match="expected 4 images"):
        page.add(4, [edits(1, 16, 16, 0), edits(2, 16, 16, 0)])


def generate_cfg(folder, tmp_path, *overrides):
    from tuner.compose import compose

    return compose("generate", [
        "model=flux_kontext", f"model.path={folder}", "model.control_auto_resize=false", "data.resolution=32",
        f"model.max_sequence_length={LENGTH}", 'generate.prompts=["make it red"]', "generate.steps=2",
        f"output_dir={tmp_path / 'out'}", *overrides,
    ])  # fmt: skip


def test_generate_edits_its_controls_and_is_refused_where_it_cannot(kontext, tmp_path):
    """``generate.controls`` draws the pipeline's edit of the control (the file given, unchanged) and lists it; it is
    refused without an edit family, with init_image, above the family's count, for a missing file."""
    from tuner.checks import validate
    from tuner.runner import run_recipe

    family, _, pipe, folder = kontext
    control = tmp_path / "control.png"
    photo(48, 32).save(control)
    before = control.read_bytes()
    cfg = generate_cfg(folder, tmp_path, f"generate.controls=[{control}]", "generate.seed=7")
    validate(cfg)
    run_recipe(cfg)
    entries = [json.loads(line) for line in (tmp_path / "out" / "images" / "images.jsonl").read_text().splitlines()]
    assert entries[0]["controls"] == [str(control)] and control.read_bytes() == before
    drawn = np.asarray(Image.open(tmp_path / "out" / "images" / entries[0]["file"]), dtype=np.float32)
    theirs = pipe(
        prompt="make it red", image=Image.open(control), height=32, width=32, max_area=32 * 32, _auto_resize=False,
        num_inference_steps=2, guidance_scale=cfg.generate.guidance_scale or cfg.sample.guidance_scale,
        max_sequence_length=LENGTH, generator=torch.Generator().manual_seed(entries[0]["seed"]), output_type="np",
    ).images[0]  # fmt: skip
    assert np.abs(drawn - theirs * 255).max() <= 1  # uint8 rounding (without the control it is 1.9 off)
    html = (tmp_path / "out" / "images" / "index.html").read_text()
    assert html.index("controls/control0.png") < html.index(entries[0]["file"])
    for overrides, said in [
        ([f"generate.controls=[{control},{control}]"], "reads at most 1"),
        ([f"generate.controls=[{control}]", f"generate.init_image={control}"], "generate.init_image"),
        ([f"generate.controls=[{tmp_path / 'gone.png'}]"], r"generate.controls\[0\]=.*gone.png: no such file"),
    ]:
        with pytest.raises(ConfigError, match=said):
            validate(generate_cfg(folder, tmp_path, *overrides))


def test_generate_controls_on_a_family_without_references_is_refused(tiny_pipeline_dir, tmp_path):
    from tuner.checks import validate
    from tuner.compose import compose

    control = tmp_path / "control.png"
    photo(16, 16).save(control)
    cfg = compose("generate", [f"model.path={tiny_pipeline_dir}", "data.resolution=16", 'generate.prompts=["a"]',
                               f"generate.controls=[{control}]", f"output_dir={tmp_path / 'out'}"])  # fmt: skip
    with pytest.raises(ConfigError, match="model=sd15 reads no reference images"):
        validate(cfg)


def pair_dataset(root):
    """Four 32 px targets, three with a control (48 x 32) in a folder of their own and one plain; with
    data.val_split=0.25 and seed 0 the held-out one is p0 (a pair)."""
    targets, controls = root / "targets", root / "controls"
    targets.mkdir()
    controls.mkdir()
    for i in range(4):
        photo(32, 32, seed=i).save(targets / f"p{i}.png")
        if i < 3:
            photo(48, 32, seed=10 + i).save(controls / f"p{i}.png")
    return targets, controls


@pytest.mark.e2e
def test_edit_lora_trains_pairs_and_shows_and_exports_the_edit(kontext, tmp_path):
    """``recipe=edit_lora`` on pairs with an optional control and a plain image: the held-out loss is logged; the
    validation page and the gallery show the held-out pair's control | base | fine-tuned | target; the exported
    LoRA loaded by FluxKontextPipeline changes the edit of the held-out control, to the gallery's fine-tuned cell;
    ``recipe=generate generate.controls=[...]`` with the run draws that edit too."""
    from accelerate.state import AcceleratorState, GradientState
    from diffusers import FluxKontextPipeline

    from tuner.checks import validate
    from tuner.compose import compose
    from tuner.runner import run_recipe

    family, _, _, folder = kontext
    targets, controls = pair_dataset(tmp_path)
    run = tmp_path / "run"
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    cfg = compose("edit_lora", [
        f"model.path={folder}", "model.control_auto_resize=false", f"model.max_sequence_length={LENGTH}",
        "data.resolution=32", "data.bucket_step=16", f"data.instance_dir={targets}", f"data.controls=[{controls}]",
        "data.instance_prompt=make it red", "data.val_split=0.25", "train.max_steps=3", "train.learning_rate=3e-2",
        "validation.every=3", "validation.pairs=2", "validation.steps=2", "validation.seeds=[0]", "sample.seeds=[0,1]",
        "sample.steps=2", "sample.display_size=32", "log.tensorboard=false", "export.formats=[diffusers]",
        f"output_dir={run}",
    ])  # fmt: skip
    validate(cfg)
    run_recipe(cfg)
    summary = json.loads((run / "summary.json").read_text())["metrics"]
    assert "val_loss" in summary["validation"]
    page = (run / "validation" / "index.html").read_text()
    assert "p0.png (held out): make it red" in page and "<th>0 (base)</th>" in page and "<th>3</th>" in page
    assert (run / "validation" / "pairs" / "p0_control0.png").is_file()
    assert (run / "validation" / "pairs" / "p0_target.png").is_file() and (
        run / "validation" / "step_000003.png"
    ).is_file()
    gallery = (run / "gallery" / "index.html").read_text()
    assert "p0.png (held out): make it red" in gallery and "p1.png: make it red" in gallery
    cells = run / "gallery" / "cells"

    def cell(name):  # 32 px cells at display size 32: as drawn
        return np.asarray(Image.open(cells / name), dtype=np.float32)

    held_out = Image.open(controls / "p0.png")
    pipe = FluxKontextPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)

    def edit(seed):
        return pipe(
            prompt="make it red", image=held_out, height=32, width=32, max_area=32 * 32, _auto_resize=False,
            num_inference_steps=2, guidance_scale=cfg.sample.guidance_scale, max_sequence_length=LENGTH,
            generator=torch.Generator().manual_seed(seed), output_type="np",
        ).images[0] * 255  # fmt: skip

    base = edit(0)
    assert np.abs(cell("row0_base_seed0.png") - base).max() <= 1
    pipe.load_lora_weights(run / "diffusers")
    tuned = edit(0)
    assert np.abs(tuned - base).max() > 8  # the adapter changes the edit of the held-out control
    assert np.abs(cell("row0_tuned_seed0.png") - tuned).max() <= 1
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    made = compose("generate", [
        "model=flux_kontext", f"model.path={folder}", "model.control_auto_resize=false", "data.resolution=32",
        f"model.max_sequence_length={LENGTH}", f"generate.adapters=[{{path:{run}}}]",
        f"generate.controls=[{controls / 'p0.png'}]", 'generate.prompts=["make it red"]', "generate.steps=2",
        f"generate.guidance_scale={cfg.sample.guidance_scale}", f"output_dir={tmp_path / 'edits'}",
    ])  # fmt: skip
    validate(made)
    run_recipe(made)
    drawn = np.asarray(Image.open(tmp_path / "edits" / "images" / "0000-seed0.png"), dtype=np.float32)
    assert np.abs(drawn - tuned).max() <= 1


@pytest.mark.e2e
def test_a_family_that_only_edits_shows_pairs_of_several_controls_and_generate_needs_one(tmp_path, monkeypatch):
    """Qwen-Image-Edit (``References.required``, up to three references): a pair with two controls and one with one
    are drawn on the validation page and in the gallery (a blank cell where the second is absent); generate without
    ``generate.controls`` is refused, naming the key."""
    from accelerate.state import AcceleratorState, GradientState
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus as plus

    from tuner.checks import validate
    from tuner.compose import compose
    from tuner.models.tiny import make_tiny_pipeline
    from tuner.runner import run_recipe

    monkeypatch.setattr(plus, "VAE_IMAGE_SIZE", 32 * 32)  # the pipeline's areas, small (the family reads them)
    monkeypatch.setattr(plus, "CONDITION_IMAGE_SIZE", 56 * 56)
    tiny = make_tiny_pipeline(tmp_path / "pipe", family="qwen_image_edit")
    targets, controls = pair_dataset(tmp_path)
    second = tmp_path / "second"
    second.mkdir()
    photo(32, 32, seed=20).save(second / "p0.png")
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    run = tmp_path / "run"
    cfg = compose("edit_lora", [
        "model=qwen_image_edit", f"model.path={tiny}", "model.max_sequence_length=128", "data.resolution=32",
        "data.bucket_step=16", f"data.instance_dir={targets}", f"data.controls=[{controls},{second}]",
        "data.instance_prompt=make it red", "data.val_split=0.25", "train.max_steps=2", "validation.every=2",
        "validation.pairs=2", "validation.steps=2", "validation.seeds=[0]", "sample.seeds=[0]", "sample.steps=2",
        "sample.display_size=32", "log.tensorboard=false", "export.formats=[diffusers]", f"output_dir={run}",
        f"home={tmp_path / 'home'}",
    ])  # fmt: skip
    validate(cfg)
    run_recipe(cfg)
    assert sorted(p.name for p in (run / "validation" / "pairs").iterdir()) == [
        "p0_control0.png", "p0_control1.png", "p0_target.png", "p1_control0.png", "p1_target.png",
    ]  # fmt: skip
    page = (run / "gallery" / "index.html").read_text()
    assert page.index("row0_control1.png") < page.index("row0_base_seed0.png")
    assert "row1_control1.png" not in page and (run / "gallery" / "cells" / "row1_tuned_seed0.png").is_file()
    grid = Image.open(run / "gallery" / "grid.png")
    assert grid.size[0] == LABEL_WIDTH + 5 * (32 + PAD)  # control 1 | control 2 | base | fine-tuned | target
    refused = compose("generate", [
        "model=qwen_image_edit", f"model.path={tiny}", 'generate.prompts=["make it red"]', "data.resolution=32",
        f"output_dir={tmp_path / 'edits'}",
    ])  # fmt: skip
    with pytest.raises(ConfigError, match=r"generate.controls: model=qwen_image_edit's pipeline edits"):
        validate(refused)


def test_evaluate_is_refused_for_a_family_that_only_edits(tmp_path):
    """recipe=evaluate samples prompts alone: for a family whose pipeline cannot draw without a reference it is
    refused before loading, saying where its edits are measured; a family that also draws text alone takes it."""
    from tuner.compose import compose
    from tuner.models import family_names, get_family

    refs = {n: get_family(n).REFERENCES for n in family_names()}
    only_edits = next(n for n, r in refs.items() if r is not None and r.required)
    also_draws = next(n for n, r in refs.items() if r is not None and not r.required)
    args = [f"model.path={tmp_path}", "data.instance_prompt=x", "data.class_prompt=null"]
    from tuner.stages.evaluate import _check_evaluate

    with pytest.raises(ConfigError, match=f"model={only_edits}'s pipeline only edits reference images"):
        _check_evaluate(compose("evaluate", [f"model={only_edits}", *args]))
    _check_evaluate(compose("evaluate", [f"model={also_draws}", *args]))
