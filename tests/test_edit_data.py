"""Edit pairs (issue #39) from the folders to the batches: prepare's controls and its report of every pair, the
control latents in the shared cache, the batches that carry them, and (e2e) a pair dataset trained."""

import hashlib
import io
import json
from dataclasses import dataclass

import pytest
from PIL import Image

from tuner.data.prepare import Source, load_prepared, prepare
from tuner.data_config import DataConfig
from tuner.models.references import References


@dataclass(frozen=True)
class Squash(References):
    """A rule as the pipelines' (a LANCZOS squash), to a fixed size: enough to see prepare apply it."""

    side: int = 16

    def vae_image(self, image):
        if min(image.size) < 12:  # as Flux.2's pipelines refuse a reference under 64 px
            raise ValueError("under 12 px")
        return image.resize((self.side, self.side), Image.Resampling.LANCZOS)


@dataclass(frozen=True)
class Prompted(Squash):
    """A rule whose text encoder reads its references too (as Qwen-Image-Edit's)."""

    def prompt_image(self, image):
        return image.resize((8, 8), Image.Resampling.LANCZOS)


def _png(size, color) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def _digest(folder):
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()}


@pytest.fixture
def pairs(tmp_path):
    """Targets and one control folder with every kind of pair: kept, optional control missing, control unreadable,
    aspect far from the target's, a duplicate pair, the same target with another control, a control alone, a control
    the family's rule refuses."""
    targets, controls = tmp_path / "targets", tmp_path / "controls"
    targets.mkdir(), controls.mkdir()
    for name, color in [("a", (200, 0, 0)), ("b", (0, 200, 0)), ("c", (0, 0, 200)), ("d", (90, 90, 0))]:
        (targets / f"{name}.png").write_bytes(_png((24, 20), color))
    (targets / "e.png").write_bytes((targets / "a.png").read_bytes())  # a's target and control again
    (targets / "f.png").write_bytes((targets / "a.png").read_bytes())  # a's target, another control
    (targets / "a.txt").write_text("make it red")
    (controls / "a.jpg").write_bytes(_png((20, 20), (10, 10, 10)))
    (controls / "e.png").write_bytes((controls / "a.jpg").read_bytes())
    (controls / "f.png").write_bytes(_png((20, 18), (50, 60, 70)))
    (controls / "c.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    (controls / "d.png").write_bytes(_png((90, 20), (1, 2, 3)))
    (controls / "orphan.png").write_bytes(_png((20, 20), (4, 5, 6)))
    (targets / "g.png").write_bytes(_png((24, 20), (7, 7, 7)))
    (controls / "g.png").write_bytes(_png((10, 10), (8, 8, 8)))
    return targets, controls


def test_prepare_names_every_pair_and_keeps_plain_images(pairs, tmp_path):
    targets, controls = pairs
    before = _digest(tmp_path)
    d = DataConfig(resolution=16, controls=[str(controls)])
    report = prepare([Source(str(targets))], tmp_path / "out", d, "edit", references=Squash(most=2))
    assert _digest(tmp_path / "targets") | _digest(tmp_path / "controls") == before  # sources untouched
    by_target = {p["target"]: p for p in report.pairs}
    assert by_target["a.png"] == {"target": "a.png", "controls": ["data.controls[0]:a.jpg"], "status": "kept"}
    assert by_target["b.png"] == {
        "target": "b.png",
        "controls": [],
        "status": "plain",
        "missing": ["data.controls[0]:b"],
    }
    assert by_target["c.png"]["reason"] == "control unreadable (not an image)"
    assert by_target["d.png"]["reason"] == "control aspect far from the target's (over data.max_ratio)"
    assert by_target["e.png"]["reason"] == "duplicate pair" and by_target["f.png"]["status"] == "kept"
    assert by_target["data.controls[0]:orphan.png"]["reason"] == "control without a target"
    assert by_target["g.png"]["reason"] == "control refused by the family's rule (under 12 px)"
    assert sorted(report.kept) == ["a.png", "b.png", "f.png"]
    assert "pairs: 2 kept, 1 plain, 5 rejected" in report.summary()
    assert json.loads((tmp_path / "out" / "report.json").read_text())["pairs"] == report.pairs

    rows = {r["source"]: r for r in load_prepared(tmp_path / "out")}
    assert [c.size for c in rows["a.png"]["controls"]] == [(16, 16)] and rows["a.png"]["caption"] == "make it red"
    assert rows["a.png"]["control_sources"] == [str((controls / "a.jpg").resolve())]
    assert rows["b.png"]["controls"] == [] and rows["b.png"]["control_sources"] == []
    assert rows["a.png"]["control_prompts"] == []  # only a family whose text encoder reads them gets these

    again = prepare([Source(str(targets))], tmp_path / "out", d, "edit", references=Squash(most=2))
    assert again.pairs == report.pairs  # nothing changed: nothing done
    strict = DataConfig(resolution=16, controls=[str(controls)], require_controls=True)
    report = prepare(
        [Source(str(targets))],
        tmp_path / "strict",
        strict,
        "edit",
        references=Prompted(most=2, in_prompt=True, side=12),
    )
    assert report.rejected["missing control (data.require_controls)"] == ["b.png"]
    rows = {r["source"]: r for r in load_prepared(tmp_path / "strict")}
    assert [c.size for c in rows["a.png"]["controls"]] == [(12, 12)]
    assert [c.size for c in rows["a.png"]["control_prompts"]] == [(8, 8)]


def test_a_pairs_file_lists_targets_controls_and_captions(tmp_path):
    root = tmp_path / "set"
    (root / "in").mkdir(parents=True)
    (root / "t1.png").write_bytes(_png((20, 20), (200, 0, 0)))
    (root / "t2.png").write_bytes(_png((20, 20), (0, 200, 0)))
    (root / "in" / "x.png").write_bytes(_png((20, 20), (0, 0, 200)))
    (root / "in" / "y.png").write_bytes(_png((20, 20), (0, 90, 90)))
    (tmp_path / "secret.png").write_bytes(_png((20, 20), (9, 9, 9)))
    lines = [
        {"target": "t1.png", "controls": ["in/x.png", "in/y.png"], "caption": "both"},
        {"target": "t2.png", "controls": ["../secret.png"]},
        {"target": "t2.png", "controls": ["in/gone.png"]},
        {"target": "t2.png"},
        {"controls": ["in/x.png"]},
    ]
    (root / "pairs.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    d = DataConfig(resolution=16, pairs=str(root / "pairs.jsonl"))
    report = prepare([], tmp_path / "out", d, "plain", references=Squash(most=2, side=8))
    assert report.rejected == {
        "control outside the dataset root": ["t2.png"],
        "control unreadable (missing file)": ["t2.png"],
        "pairs line without a target": ["pairs.jsonl:5"],
    }
    rows = list(load_prepared(tmp_path / "out"))
    assert [(r["source"], r["caption"], len(r["controls"])) for r in rows] == [
        ("t1.png", "both", 2),
        ("t2.png", "plain", 0),
    ]
    assert rows[0]["control_sources"] == [str(root / "in" / "x.png"), str(root / "in" / "y.png")]


def test_a_batch_carries_its_references_and_never_mixes_their_shapes():
    """Pairs and plain images of one target size: each batch is all pairs (with ``control_k``, the mean normalised
    as the target latents) or all plain; batches of other references' shapes are not merged; caption dropout of a
    row whose prompt reads its references goes to that row's own empty caption."""
    import torch

    from tuner.training.batches import (
        Batch,
        Captions,
        ControlLatents,
        LatentCache,
        SampleSet,
        draw_batch,
        merge_by_shape,
    )

    n, g = 6, torch.Generator().manual_seed(0)
    latents = LatentCache(torch.randn(n, 4, 2, 2), torch.zeros(n, 4, 2, 2), 2.0, 0.5)
    means = [torch.randn(4, 2, 2), torch.randn(4, 3, 2), torch.randn(4, 2, 2)]
    rows = [[0], [1], [], [2], [0, 2], []]  # samples 0 and 3 share a shape; 4 has two references; 2 and 5 none
    controls = ControlLatents(means, rows, 2.0, 0.5)
    cond = Captions(["a", "b", ""], {"embeds": torch.arange(3.0)[:, None]}, dropout=1.0, empty=torch.tensor([2, 0, 2]))
    s = SampleSet(latents, cond, torch.tensor([0, 1, 1, 0, 0, 1]), controls=controls)
    seen = []
    for _ in range(5):
        (batch,) = draw_batch([s], 2, g)
        keys = sorted(k for k in batch.cond if k.startswith("control_"))
        seen.append(len(keys))
        for k in keys:
            assert batch.cond[k].shape[0] == len(batch.latents)
        if keys == ["control_0"] and batch.cond["control_0"].shape[-2] == 2 and len(batch.latents) == 2:
            expected = [(means[0] - 0.5) * 2, (means[2] - 0.5) * 2]  # samples 0 and 3, in either order
            assert sorted(any(torch.equal(row, e) for row in batch.cond["control_0"]) for e in expected) == [True] * 2
        assert batch.cond["embeds"].flatten().tolist() in ([2.0], [2.0, 2.0], [0.0], [2.0, 0.0], [0.0, 2.0], [0.0, 0.0])
    assert set(seen) == {0, 1, 2}

    def part(shape):
        b = len(shape[0])
        return Batch(
            torch.zeros(b, 4, 2, 2),
            {"embeds": torch.zeros(b, 1), "control_0": torch.zeros(b, *shape[1])},
            torch.ones(b),
        )

    merged = merge_by_shape([part(([0], (4, 2, 2))), part(([0, 1], (4, 3, 2))), part(([0], (4, 2, 2)))])
    assert [len(m.latents) for m in merged] == [2, 2]
    plain = Batch(torch.zeros(1, 4, 2, 2), {"embeds": torch.zeros(1, 1)}, torch.ones(1))
    assert len(merge_by_shape([part(([0], (4, 2, 2))), plain])) == 2


# ---------------------------------------------------------------- e2e: a pair dataset trained


def _pair_dataset(root):
    """Four targets: three with a control (their colours inverted), one plain; sizes that need two buckets."""
    targets, controls = root / "after", root / "before"
    targets.mkdir(parents=True), controls.mkdir()
    for i, color in enumerate([(220, 30, 30), (30, 220, 30), (30, 30, 220), (200, 200, 30)]):
        Image.new("RGB", (24 + 8 * (i % 2), 24), color).save(targets / f"p{i}.png")
        if i < 3:
            Image.new("RGB", (32, 32), tuple(255 - c for c in color)).save(controls / f"p{i}.jpg")
    return targets, controls


def _train_edits(tmp_path, tiny, name, *overrides):
    from accelerate.state import AcceleratorState, GradientState

    from tuner.checks import validate
    from tuner.compose import compose
    from tuner.runner import run_recipe

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    targets, controls = tmp_path / "after", tmp_path / "before"
    cfg = compose(
        "edit_lora",
        [
            f"model.path={tiny}",
            "model.max_sequence_length=32",
            "model.control_auto_resize=false",
            "data.resolution=16",
            "data.bucket_step=8",
            f"data.instance_dir={targets}",
            f"data.controls=[{controls}]",
            "data.instance_prompt=make it odd",
            "data.val_split=0.25",
            "train.max_steps=3",
            "train.batch_size=2",
            "train.learning_rate=1e-2",
            "validation.every=3",
            "validation.pairs=1",
            "sample.steps=2",
            "log.tensorboard=false",
            "export.formats=[diffusers]",
            f"output_dir={tmp_path / name}",
            *overrides,
        ],
    )
    validate(cfg)
    return cfg, run_recipe(cfg)


@pytest.mark.e2e
def test_edit_lora_trains_pairs_and_plain_images_and_its_adapter_changes_a_held_out_edit(tmp_path, monkeypatch):
    """recipe=edit_lora on a tiny Flux.1 Kontext: pairs (one held out) and a plain image train; every training and
    held-out sample with a control reaches predict with it (cond["control_0"]) and the plain one without; the
    control's cached latents are the VAE's mean, normalised; a second run encodes no control again; the exported
    adapter, loaded by the family's diffusers pipeline, changes the edit of the held-out control at a fixed seed."""
    import numpy as np
    import torch

    from tuner.data.prepare import load_prepared
    from tuner.data.prepared import control_keys, control_pixels
    from tuner.models import get_family
    from tuner.models.flux_kontext import FluxKontext
    from tuner.models.tiny import make_tiny_pipeline
    from tuner.sampling import edit_pairs
    from tuner.training.cache import Store, fingerprint

    calls = []
    original = FluxKontext.predict

    def predict(self, denoiser, noisy, timesteps, cond):  # the family's own, with what it was given noted
        calls.append((len(noisy), tuple(tuple(v.shape) for k, v in sorted(cond.items()) if k.startswith("control_"))))
        return original(self, denoiser, noisy, timesteps, cond)

    monkeypatch.setattr(FluxKontext, "predict", predict)
    tiny = make_tiny_pipeline(tmp_path / "pipe", family="flux_kontext")
    _pair_dataset(tmp_path)
    cfg, run = _train_edits(tmp_path, tiny, "run")

    pairs = {p["target"]: p["status"] for p in json.loads((run.dir / "report.json").read_text())["pairs"]}
    assert pairs == {"p0.png": "kept", "p1.png": "kept", "p2.png": "kept", "p3.png": "plain"}
    encoded = run.metrics["cache"]["encoded"]
    assert encoded["controls-instance"] + encoded["controls-held-out instance"] == 3
    assert "3" in {str(k) for k in run.metrics["validation"]["val_loss"]}
    # a batch of pairs has its control's latents (32 px -> 4x4), a plain batch none: never mixed
    assert {len(shapes) for _, shapes in calls} == {0, 1}
    for n, shapes in calls:
        assert all(shape[0] == n and shape[-2:] == (4, 4) for shape in shapes)

    family = get_family("flux_kontext", run.cfg.model)
    dataset = load_prepared(run.dir / "data" / "instance")
    key = control_keys(dataset, family.REFERENCES.rule())[0][0]
    vae = run.components.vae
    store = Store(run.cache_dir, f"latents-{fingerprint('latents', str(next(vae.parameters()).dtype), modules=[vae])}")
    cached_mean = store.open([key])[0]["mean"]
    mean, _ = family.encode_images(vae, control_pixels(dataset, 0, 0)[None].to(vae.dtype))
    assert torch.allclose(cached_mean, mean[0].float(), atol=1e-5)

    _, again = _train_edits(tmp_path, tiny, "again", "train.max_steps=1", "stages=[base,prepare,train]")
    assert again.metrics["cache"]["encoded"]["controls-instance"] == 0

    (pair,) = edit_pairs(run.dir, cfg, 1)  # the held-out pair comes first
    pipe = family.load_pipeline(tiny)
    pipe.set_progress_bar_config(disable=True)

    def edit():
        call = family.REFERENCES.call(pair.controls, 16, 16)
        generator = torch.Generator().manual_seed(0)
        return pipe(prompt=pair.prompt, num_inference_steps=2, generator=generator, output_type="np", **call).images[0]

    before = edit()
    pipe.load_lora_weights(str(run.dir / "diffusers"))
    assert np.abs(edit() - before).max() > 1e-3


@pytest.mark.e2e
def test_a_family_whose_text_encoder_reads_references_caches_each_prompt_with_them(tmp_path, monkeypatch):
    """Qwen-Image-Edit (its text encoder reads the references): two control folders, targets with two, one and no
    control; each (caption, references) is a prompt row of its own, with its own empty caption's row for dropout,
    and batches carry as many references as their samples have."""
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus as plus

    from tuner.models.qwen_image_edit import QwenImageEdit
    from tuner.models.tiny import make_tiny_pipeline

    monkeypatch.setattr(plus, "VAE_IMAGE_SIZE", 32 * 32)  # the pipeline's areas, small (the family reads them)
    monkeypatch.setattr(plus, "CONDITION_IMAGE_SIZE", 56 * 56)
    calls = []
    original = QwenImageEdit.predict

    def predict(self, denoiser, noisy, timesteps, cond):
        calls.append(sum(k.startswith("control_") for k in cond))
        return original(self, denoiser, noisy, timesteps, cond)

    monkeypatch.setattr(QwenImageEdit, "predict", predict)
    tiny = make_tiny_pipeline(tmp_path / "pipe", family="qwen_image_edit")
    targets, controls = _pair_dataset(tmp_path)
    second = tmp_path / "second"
    second.mkdir()
    Image.new("RGB", (32, 32), (9, 99, 199)).save(second / "p0.png")
    _, run = _train_edits(
        tmp_path, tiny, "run", "model=qwen_image_edit", "model.max_sequence_length=128", "data.val_split=0",
        f"data.controls=[{controls},{second}]", "data.caption_dropout=0.5", "validation.every=0",
        "train.max_steps=4", "stages=[base,prepare,train]",
    )  # fmt: skip
    # p0 (two references), p1 and p2 (one each), p3 (none): four prompt rows and their four empty captions' rows
    assert run.metrics["cache"]["entries"]["prompts"] == 8
    assert set(calls) <= {0, 1, 2} and len(set(calls)) >= 2


def test_pairs_are_refused_where_the_family_cannot_read_them(tmp_path, monkeypatch):
    """data.controls / data.pairs on a family without references, more folders than it reads, a folder or file
    that is not there, and what a family whose text encoder reads its references cannot do: ConfigErrors naming
    the key."""
    from omegaconf import OmegaConf

    from tuner.compose import compose
    from tuner.errors import ConfigError
    from tuner.models import family_names, get_family
    from tuner.stages.data import _check_prepare

    def first(test):  # the first registered family that is so: the check holds for any family like it
        return next(n for n in family_names() if test(get_family(n).REFERENCES))

    plain, one = first(lambda r: r is None), first(lambda r: r is not None and r.most == 1 and not r.in_prompt)
    reads = first(lambda r: r is not None and r.in_prompt)
    base = [f"model.path={tmp_path}", f"data.instance_dir={tmp_path}", "data.instance_prompt=x"]
    composed = {m: compose("lora", [*base, f"model={m}"]) for m in (plain, one, reads)}

    def check(*overrides):  # one composition per family, the other keys merged onto it
        model = next((o.split("=")[1] for o in overrides if o.startswith("model=")), plain)
        rest = [o for o in overrides if not o.startswith("model=")]
        _check_prepare(OmegaConf.merge(composed[model], OmegaConf.from_dotlist(rest)))

    with pytest.raises(ConfigError, match=rf"data.controls: model={plain} reads no reference images"):
        check(f"data.controls=[{tmp_path}]")
    with pytest.raises(ConfigError, match=rf"data.pairs: model={plain}"):
        check(f"data.pairs={tmp_path}/p.jsonl")
    with pytest.raises(ConfigError, match=rf"data.controls: 2 folders, but model={one} reads at most 1"):
        check(f"model={one}", f"data.controls=[{tmp_path},{tmp_path}]")
    with pytest.raises(ConfigError, match=r"data.controls\[0\]=.*gone: no such folder"):
        check(f"model={one}", f"data.controls=[{tmp_path}/gone]")
    with pytest.raises(ConfigError, match=r"data.pairs=.*p.jsonl: no such file"):
        check(f"model={one}", f"data.pairs={tmp_path}/p.jsonl")
    check(f"model={one}", f"data.controls=[{tmp_path}]", "data.shuffle_tags=true")  # its prompts read no image
    with pytest.raises(ConfigError, match=rf"data.shuffle_tags=true: model={reads}'s text encoder reads"):
        check(f"model={reads}", f"data.controls=[{tmp_path}]", "data.shuffle_tags=true")
    with pytest.raises(ConfigError, match=rf"text_encoder.train=lora: model={reads}'s text encoder reads"):
        check(f"model={reads}", f"data.controls=[{tmp_path}]", "text_encoder.train=lora")
