"""Knowing when a run learned: the held-out loss (tuner/training/held_out.py), the metrics of samples
(tuner/scoring.py), the best checkpoint and early stop (tuner/training/selection.py), the validation page's charts."""

import json
import xml.etree.ElementTree as ET

import numpy as np
import pytest
import torch

from tests.helpers import PROMPT, ROOT, adapter, assert_same, make_photos, train_in_process
from tuner.checks import validate
from tuner.compose import compose
from tuner.data.apart import split
from tuner.errors import ConfigError
from tuner.export.charts import line_chart
from tuner.scoring import FeatureModel, Scorer, mean_cosine, self_similarity
from tuner.training.selection import Selection

# 3 photos: one held out, two trained on; samples and the held-out loss at every second step
VAL = [
    "data.val_split=0.3",
    "validation.every=2",
    "validation.seeds=[0]",
    "validation.steps=2",
    "validation.samples=2",
    "validation.loss_timesteps=3",
    "train.batch_size=2",
]


@pytest.fixture(scope="module")
def feature_models(tmp_path_factory):
    from tuner.models.tiny import make_tiny_feature_model

    root = tmp_path_factory.mktemp("features")
    return make_tiny_feature_model(root / "clip", "clip"), make_tiny_feature_model(root / "dino", "dino")


# ------------------------------------------------------------------ numbers against independent computations


def test_cosine_means_match_a_computation_by_hand():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(4, 5)), rng.normal(size=(3, 5))
    by_hand = np.mean([[x @ y / np.linalg.norm(x) / np.linalg.norm(y) for y in b] for x in a])
    assert mean_cosine(torch.tensor(a), torch.tensor(b)) == pytest.approx(by_hand, abs=1e-12)
    pairs = [a[i] @ a[j] / np.linalg.norm(a[i]) / np.linalg.norm(a[j]) for i in range(4) for j in range(4) if i != j]
    assert self_similarity(torch.tensor(a)) == pytest.approx(np.mean(pairs), abs=1e-12)


def test_scores_equal_transformers_features_compared_by_hand(feature_models):
    """clip_i, clip_t, dino, diversity and drift against features computed with transformers directly."""
    from PIL import Image
    from transformers import AutoImageProcessor, AutoModel, CLIPModel, CLIPTokenizer

    clip_dir, dino_dir = feature_models
    g = torch.Generator().manual_seed(0)
    subject, samples, classes, base_classes = (torch.rand(n, 3, 24, 24, generator=g) * 2 - 1 for n in (3, 4, 4, 4))
    scorer = Scorer(subject, PROMPT, "a photo of a ball", FeatureModel(str(clip_dir), "clip", "cpu"),
                    FeatureModel(str(dino_dir), "dino", "cpu"))  # fmt: skip
    base = scorer.class_similarity(base_classes)
    got = scorer.score(samples, classes, base)

    def pil(images):
        return [Image.fromarray(((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()) for x in images]

    def unit(x):
        x = x.double()
        return x / x.norm(dim=-1, keepdim=True)

    clip, processor = CLIPModel.from_pretrained(clip_dir).eval(), AutoImageProcessor.from_pretrained(clip_dir)
    tokens = CLIPTokenizer.from_pretrained(clip_dir)([PROMPT], padding=True, return_tensors="pt")
    with torch.no_grad():
        image = lambda x: unit(clip.get_image_features(**processor(images=pil(x), return_tensors="pt")).pooler_output)  # noqa: E731
        text = unit(clip.get_text_features(input_ids=tokens["input_ids"]).pooler_output)
        dino, dino_processor = AutoModel.from_pretrained(dino_dir).eval(), AutoImageProcessor.from_pretrained(dino_dir)
        cls = lambda x: unit(dino(**dino_processor(images=pil(x), return_tensors="pt")).last_hidden_state[:, 0])  # noqa: E731
        s, r = image(samples), image(subject)
        ds, dr = cls(samples), cls(subject)
        drift = float((cls(classes) @ dr.T).mean() - (cls(base_classes) @ dr.T).mean())
    assert got["clip_i"] == pytest.approx(float((s @ r.T).mean()), abs=1e-6)
    assert got["clip_t"] == pytest.approx(float((s @ text.T).mean()), abs=1e-6)
    assert got["dino"] == pytest.approx(float((ds @ dr.T).mean()), abs=1e-6)
    off = (ds @ ds.T).sum() - ds.shape[0]
    assert got["diversity"] == pytest.approx(1 - float(off / (ds.shape[0] * (ds.shape[0] - 1))), abs=1e-6)
    assert got["drift"] == pytest.approx(drift, abs=1e-6)  # DINO's: the most telling model present
    assert got["fidelity"] == got["dino"] and got["score"] == pytest.approx(got["dino"] - max(got["drift"], 0))


def test_the_digits_judge_tells_the_subject_from_the_digit():
    from tuner.digits import data as digits
    from tuner.digits.stages import DigitJudge

    cfg = compose("quickstart", ["data.resolution=16"])
    ink = digits.subject_ink(7, "mirror", 5, 0)
    subject = digits.ink_to_pixels(ink, 16)
    judge = DigitJudge(cfg, list(subject))
    images, labels = digits.load_images(16)
    sevens, threes = images[labels == 7][:40], images[labels == 3][:40]
    assert judge.is_subject(subject).all()
    larger = [torch.nn.functional.interpolate(x[None], size=(24, 24), mode="nearest")[0] for x in subject]
    assert DigitJudge(cfg, larger[:3] + list(subject[3:])).is_subject(subject).all()  # subject images of any size
    assert judge.is_class(sevens).mean() > 0.9 and judge.is_subject(sevens).mean() < 0.1
    assert judge.is_class(threes).mean() < 0.1
    assert (
        DigitJudge(compose("quickstart", ["data.class_prompt=a photo of a digit"]), list(subject)).is_class(sevens)
        is None
    )


def test_held_out_images_are_chosen_by_seed_and_never_all():
    kept, held = split(10, 0.2, 0, "instance")
    assert len(held) == 2 and sorted(kept + held) == list(range(10))
    assert split(10, 0.2, 0, "instance") == (kept, held) and split(10, 0.2, 1, "instance") != (kept, held)
    assert len(split(3, 0.1, 0, "instance")[1]) == 1  # at least one
    with pytest.raises(ConfigError, match=r"data.val_split=0.5: the class set has 1 image"):
        split(1, 0.5, 0, "class")


# ------------------------------------------------------------------ the selection's decisions


def test_selection_ranks_stops_on_patience_and_keeps_the_best():
    s = Selection("val_loss", best=2, patience=2, min_delta=0.01)
    for step, value in [(2, 1.0), (4, 0.8), (6, 0.795), (8, 0.9)]:
        s.observe(step, {"val_loss": value})
    assert s.ranked() == [6, 4, 8, 2] and s.best_step() == 6 and s.protected() == {6, 4}
    assert s.stopped["step"] == 8 and s.stopped["kind"] == "patience"  # 6 and 8 improved by less than 0.01
    again = Selection("val_loss", best=2, patience=2, min_delta=0.01)
    again.load_state_dict(json.loads(json.dumps(s.state_dict())))
    assert again.ranked() == s.ranked() and again.stopped == s.stopped
    up = Selection("clip_i")  # a similarity: the higher the better
    for step, value in [(2, 0.5), (4, 0.7), (6, 0.7)]:
        up.observe(step, {"clip_i": value})
    assert up.mode == "max" and up.best_step() == 6  # of two equal, the later
    assert Selection("clip_i", mode="min").mode == "min"


def test_selection_stops_when_drift_passes_its_bound_and_keeps_the_last_step_within():
    s = Selection(None, max_drift=0.1)
    for step, drift in [(2, 0.02), (4, 0.09), (6, 0.15), (8, 0.01)]:
        s.observe(step, {"drift": drift})
    assert s.stopped == {"kind": "drift", "step": 6, "reason": s.stopped["reason"], "keep": 4}
    assert "0.15" in s.stopped["reason"] and s.protected() == {4}
    # selecting too: the best step up to the last one within the bound is kept, however far back
    both = Selection("score", best=1, max_drift=0.1)
    for step, score, drift in [(100, 0.9, 0.0), (200, 0.5, 0.05), (300, 0.6, 0.08), (400, 0.95, 0.2)]:
        both.observe(step, {"score": score, "drift": drift})
    assert both.stopped["keep"] == 300 and both.best_step(300) == 100 and both.protected() == {400, 300, 100}
    assert both.chosen(400, best=False)[0] == 300 and both.chosen(400, best=True)[0] == 100
    assert "up to step 300" in both.chosen(400, best=True)[1]


def test_a_chart_draws_each_point_and_marks_the_chosen_step():
    svg = line_chart("val_loss", [(0, 1.0), (2, 0.5), (4, 0.75), (6, float("nan"))], marked=2, note="best")
    root = ET.fromstring(svg)
    ns = "{http://www.w3.org/2000/svg}"
    points = [tuple(map(float, p.split(","))) for p in root.find(f"{ns}polyline").get("points").split()]
    assert len(points) == 3  # the NaN is left out
    xs, ys = [x for x, _ in points], [y for _, y in points]
    assert xs == sorted(xs) and ys[1] == max(ys) and ys[0] == min(ys)  # SVG's y grows downward: 0.5 lowest
    (mark,) = [e for e in root.iter(f"{ns}line") if e.get("class") == "marked"]
    assert float(mark.get("x1")) == pytest.approx(xs[1], abs=0.1)
    assert "best" in svg


# ------------------------------------------------------------------ the settings


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["checkpoints.select=loss"], "checkpoints.select=loss: choose one of val_loss"),
        (["checkpoints.select=val_loss", "validation.every=0"], "checkpoints.select=val_loss is judged at validation"),
        (["checkpoints.select=val_loss", "validation.every=5"], "nothing in this run measures val_loss"),
        (["checkpoints.select=clip_i", "validation.every=5"], r"it needs eval.clip=PATH"),
        (["export.from=best"], "export.from=best needs checkpoints.select"),
        (["train.early_stop.patience=2"], "train.early_stop.patience needs checkpoints.select"),
        (["data.val_split=0.1", f"data.val_dir={ROOT / 'tests' / 'data'}"], "data.val_split and data.val_dir both"),
        (["eval.clip=/nowhere/clip"], r"eval.clip=/nowhere/clip: no CLIP model folder \(transformers' CLIPModel"),
        (["train.early_stop.max_drift=0.1", "validation.every=5"], "nothing in this run measures drift"),
        (["data.val_split=1.5"], "data.val_split"),
        (
            ["checkpoints.select=diversity", "eval.clip=/tmp", "validation.every=5", "validation.samples=1"],
            "validation.samples >= 2",
        ),  # fmt: skip
    ],
)
def test_selection_settings_that_cannot_work_are_refused_by_name(tmp_path, tiny_pipeline_dir, overrides, message):
    photos = make_photos(tmp_path / "photos")
    common = [f"model.path={tiny_pipeline_dir}", f"data.instance_dir={photos}", f"data.instance_prompt={PROMPT}"]
    with pytest.raises(ConfigError, match=message):
        validate(compose("lora", [*common, f"output_dir={tmp_path / 'run'}", *overrides]))


def test_the_digits_base_selects_on_its_judge_and_export_from_is_spelled_as_written(tmp_path):
    cfg = compose("quickstart", ["checkpoints.select=score", "export.from=best", f"output_dir={tmp_path / 'q'}"])
    validate(cfg)  # the judge gives fidelity and drift on the embedded base
    assert cfg.export.from_ == "best"
    cfg = compose("quickstart", ["checkpoints.select=clip_i", f"output_dir={tmp_path / 'q'}"])
    with pytest.raises(ConfigError, match="checkpoints.select=clip_i: nothing in this run measures clip_i"):
        validate(cfg)


# ------------------------------------------------------------------ runs


def test_held_out_loss_equals_diffusers_by_hand(tmp_path, tiny_pipeline_dir):
    """The step-0 held-out loss, one image at one timestep, recomputed with diffusers' own modules: the VAE's
    posterior sample, the scheduler's add_noise, the U-Net's epsilon against the noise."""
    from diffusers import StableDiffusionPipeline

    from tuner.data.prepare import load_prepared
    from tuner.data.prepared import images_of

    run = train_in_process(tmp_path, tiny_pipeline_dir, *VAL, "train.max_steps=2", "validation.loss_timesteps=1")
    got = run.metrics["validation"]["val_loss"][0]
    dataset = load_prepared(run.dir / "data" / "instance")
    (held,) = split(len(dataset), 0.3, 0, "instance")[1]
    pipe = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir)
    g = torch.Generator().manual_seed(0)  # seed: the run's; draws: the latent's sample, then the noise
    with torch.no_grad():
        dist = pipe.vae.encode(images_of(dataset, [held])[0][None]).latent_dist
        eps = torch.randn(dist.mean.shape[1:], generator=g)
        latent = (dist.mean + dist.std * eps) * pipe.vae.config.scaling_factor
        noise = torch.randn(latent.shape[1:], generator=g)[None]
        t = torch.tensor([pipe.scheduler.config.num_train_timesteps // 2])
        ids = pipe.tokenizer([PROMPT], padding="max_length", max_length=pipe.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids  # fmt: skip
        text = pipe.text_encoder(ids)[0]
        eps_hat = pipe.unet(pipe.scheduler.add_noise(latent, noise, t), t, encoder_hidden_states=text).sample
    assert got == pytest.approx(float(torch.nn.functional.mse_loss(eps_hat, noise)), rel=1e-5)


@pytest.mark.e2e  # several trainings: the e2e tier
def test_held_out_loss_is_the_same_across_a_resume_and_validation_changes_no_weight(tmp_path, tiny_pipeline_dir):
    settings = [*VAL, "text_encoder.train=lora", "train.ema_decay=0.9", "train.lr_scheduler=cosine"]
    settings.append("train.max_steps=6")
    whole = train_in_process(tmp_path, tiny_pipeline_dir, *settings, "checkpoints.every=2", "checkpoints.keep=3",
                             name="whole")  # fmt: skip
    losses = whole.metrics["validation"]["val_loss"]
    assert sorted(losses) == [0, 2, 4, 6] and len(set(losses.values())) == 4  # it moves as the weights do
    resumed = train_in_process(tmp_path, tiny_pipeline_dir, *settings,
                               f"resume={whole.dir / 'checkpoints' / 'step-0000002'}", name="resumed")  # fmt: skip
    assert resumed.metrics["validation"]["val_loss"] == {4: losses[4], 6: losses[6]}  # bit-identical
    quiet = train_in_process(tmp_path, tiny_pipeline_dir, *settings, "validation.every=0", name="quiet")
    assert_same(adapter(whole.dir), adapter(quiet.dir))  # training is the same without validation
    assert "validation" not in quiet.metrics or not quiet.metrics["validation"]


@pytest.mark.e2e  # several trainings: the e2e tier
def test_early_stop_exports_the_best_step_which_equals_a_run_of_that_many_steps(tmp_path, tiny_pipeline_dir):
    """patience=1 with a min_delta no step can beat: stops at the second validation; export.from=best exports the
    lower held-out loss of steps 2 and 4, the same weights a run trained to that step exports."""
    stop = ["checkpoints.select=val_loss", "train.early_stop.patience=1", "train.early_stop.min_delta=1e6",
            "export.from=best", "train.max_steps=8", "checkpoints.keep=1"]  # fmt: skip
    run = train_in_process(tmp_path, tiny_pipeline_dir, *VAL, *stop, name="stopped")
    losses = run.metrics["validation"]["val_loss"]
    best = min((2, 4), key=lambda s: (losses[s], -s))
    assert run.metrics["early_stop"]["step"] == 4 and sorted(losses) == [0, 2, 4]
    assert run.metrics["selected"] == {"step": best, "of": 4, "why": run.metrics["selected"]["why"],
                                       "metric": "val_loss", "mode": "min", "value": losses[best]}  # fmt: skip
    kept = sorted(p.name for p in (run.dir / "checkpoints").iterdir())
    assert kept == sorted({f"step-{best:07d}", "step-0000004"})  # the newest, and the best beside it
    short = train_in_process(tmp_path, tiny_pipeline_dir, *VAL, f"train.max_steps={best}", name="short")
    assert_same(adapter(run.dir), adapter(short.dir))
    # the page marks the chosen step, charts each number, and the model card names it
    page = (run.dir / "validation" / "index.html").read_text()
    assert page.count("<svg") >= 2 and 'class="marked"' in page and page.count('class="chosen"') == 1
    assert json.loads((run.dir / "validation" / "steps.json").read_text())["chosen"]["step"] == best
    assert f"step {best} of 4: the best val_loss" in (run.dir / "README.md").read_text()
    # resumed where it stopped: nothing more trains, the same step is exported
    again = train_in_process(tmp_path, tiny_pipeline_dir, *VAL, *stop, "resume=auto", name="stopped")
    assert again.metrics["selected"]["step"] == best
    assert_same(adapter(run.dir), adapter(short.dir))


@pytest.mark.e2e  # several trainings: the e2e tier
def test_drift_past_its_bound_stops_and_keeps_the_last_step_within(tmp_path, tiny_pipeline_dir, feature_models):
    """Drift measured with tiny CLIP and DINO folders; the bound is put between two measured values, so the run
    must stop at the later one and keep the earlier one's weights."""
    clip, dino = feature_models
    metrics = [f"eval.clip={clip}", f"eval.dino={dino}", "data.class_prompt=a photo of a ball",
               "train.learning_rate=5e-2", "train.max_steps=8"]  # fmt: skip
    free = train_in_process(tmp_path, tiny_pipeline_dir, *VAL, *metrics, name="free")
    drift = free.metrics["validation"]["drift"]
    assert drift[0] == 0.0 and {"clip_i", "clip_t", "dino", "diversity", "val_loss"} <= set(free.metrics["validation"])
    steps = [2, 4, 6, 8]
    # the first step whose drift passes every earlier one's: a bound between them stops the run there
    high = next((b for b in steps[1:] if drift[b] > max(drift[s] for s in steps if s < b)), None)
    assert high is not None, drift
    low = high - 2
    bound = (max(drift[s] for s in steps if s < high) + drift[high]) / 2
    stopped = train_in_process(tmp_path, tiny_pipeline_dir, *VAL, *metrics, f"train.early_stop.max_drift={bound}",
                               name="bounded")  # fmt: skip
    assert stopped.metrics["early_stop"]["step"] == high
    assert stopped.metrics["selected"]["step"] == low
    assert stopped.metrics["validation"]["drift"] == {s: drift[s] for s in range(0, high + 1, 2)}
    short = train_in_process(tmp_path, tiny_pipeline_dir, *VAL, *metrics, f"train.max_steps={low}", name="short")
    assert_same(adapter(stopped.dir), adapter(short.dir))


@pytest.mark.e2e  # several trainings: the e2e tier
def test_evaluate_scores_any_base_with_local_feature_models(tmp_path, tiny_pipeline_dir, feature_models):
    clip, dino = feature_models
    trained = train_in_process(tmp_path, tiny_pipeline_dir, "train.max_steps=2", name="trained")
    photos = tmp_path / "photos"
    from accelerate.state import AcceleratorState, GradientState

    from tuner.runner import run_recipe

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    cfg = compose("evaluate", [f"model.path={tiny_pipeline_dir}", f"checkpoint={trained.dir}", "data.resolution=16",
                               f"data.instance_dir={photos}", f"data.instance_prompt={PROMPT}",
                               "data.class_prompt=a photo of a ball", f"eval.clip={clip}", f"eval.dino={dino}",
                               "eval.samples=3", "eval.steps=2", "sample.seeds=[0]", "sample.steps=2",
                               f"output_dir={tmp_path / 'eval'}"])  # fmt: skip
    validate(cfg)
    run = run_recipe(cfg)
    metrics = json.loads((run.dir / "metrics.json").read_text())
    for name in ("clip_i", "clip_t", "dino", "diversity", "fidelity", "score"):
        assert -1 <= metrics[name] <= 1 and -1 <= metrics[f"{name}_base"] <= 1, name
    assert "drift" in metrics and "drift_base" not in metrics and "subject_fidelity" not in metrics
