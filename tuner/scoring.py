"""What a fine-tune learned, in numbers: samples of the instance prompt and of the class prompt scored against
the subject's real images, at validation steps (tuner/training/monitor.py) and in the evaluate stage.

The scores are the DreamBooth paper's, from feature models the user points at (nothing is downloaded):

    clip_i        mean cosine similarity of CLIP image features, instance-prompt samples x the subject's images
    clip_t        mean cosine similarity of CLIP image features of instance-prompt samples and the prompt's text
    dino          as clip_i with DINO / DINOv2 features (the CLS token): subject fidelity
    diversity     1 - the mean similarity of the instance-prompt samples among themselves
    drift         how far class-prompt samples moved toward the subject: their similarity to the subject's images
                  minus the base model's
    fidelity      the subject fidelity of the best feature model present: the digits classifier, DINO, CLIP
    score         fidelity - max(drift, 0): the subject learned, the class kept

An embedded base may bring a judge of its own (``Judge``: the digits base's independent classifier, registered
with the base in tuner/runner.py), which gives the same kinds of number: ``subject_fidelity`` (the share of
instance-prompt samples it calls the subject), ``class_preservation`` (the share of class-prompt samples it calls
the class the prompt names) and drift (the share of class-prompt samples it calls the subject, minus the base's).
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from tuner.errors import ConfigError
from tuner.sampling import to_uint8

# every metric a validation step may give (checkpoints.select picks one); the held-out losses come from
# tuner/training/held_out.py
METRICS = (
    "val_loss",
    "val_loss_class",
    "fidelity",
    "preservation",
    "drift",
    "score",
    "clip_i",
    "clip_t",
    "dino",
    "diversity",
    "subject_fidelity",
    "class_preservation",
)
LOWER_IS_BETTER = {"val_loss", "val_loss_class", "drift"}


class Judge(Protocol):
    """An embedded base's own classifier of samples, independent of any model that trained."""

    def is_subject(self, images: torch.Tensor) -> np.ndarray:
        """Per image (N, 3, H, W) in [-1, 1]: does it show the subject?"""

    def is_class(self, images: torch.Tensor) -> np.ndarray | None:
        """Per image: does it show the class the class prompt names? None: the judge cannot tell that class."""


def direction(metric: str, mode: str | None = None) -> str:
    """``min`` or ``max``: ``mode`` if given, else the metric's own (losses and drift: min)."""
    return str(mode) if mode else ("min" if metric in LOWER_IS_BETTER else "max")


def mean_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """The mean cosine similarity over every pair of a row of ``a`` and a row of ``b``."""
    a, b = torch.nn.functional.normalize(a.double(), dim=-1), torch.nn.functional.normalize(b.double(), dim=-1)
    return float((a @ b.T).mean())


def self_similarity(a: torch.Tensor) -> float:
    """The mean cosine similarity of the rows of ``a`` among themselves (each pair once, not with itself)."""
    n = len(a)
    if n < 2:
        return float("nan")
    a = torch.nn.functional.normalize(a.double(), dim=-1)
    sims = a @ a.T
    return float((sims.sum() - sims.diagonal().sum()) / (n * (n - 1)))


def _uint8_images(images) -> list:
    """Images in [-1, 1] ((N, 3, H, W) or a list of (3, H, W)) as PIL images, as a feature model's processor
    takes them."""
    from PIL import Image

    return [Image.fromarray(to_uint8(x[None].float())[0].numpy()) for x in images]


def _pooled(output) -> torch.Tensor:
    """transformers 5 returns the projected features in an output's ``pooler_output``, earlier ones as a tensor."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class FeatureModel:
    """A local CLIP (``kind="clip"``) or DINO / DINOv2 (``kind="dino"``) model: image features (and, for CLIP,
    text features), one row per image, on the CPU in float32."""

    DESCRIBED = {"clip": "CLIP model folder (transformers' CLIPModel)", "dino": "DINO or DINOv2 model folder"}

    def __init__(self, path: str, kind: str, device, allow_pickle: bool = False, batch_size: int = 32):
        from transformers import AutoImageProcessor, AutoModel, AutoTokenizer, CLIPModel

        folder = check_folder(path, kind)
        self.kind, self.device, self.batch_size = kind, device, batch_size
        try:
            loader = CLIPModel if kind == "clip" else AutoModel
            # safetensors unless model.allow_pickle (then transformers reads .bin files with weights_only)
            self.model = loader.from_pretrained(folder, local_files_only=True, use_safetensors=not allow_pickle or None)
            self.processor = AutoImageProcessor.from_pretrained(folder, local_files_only=True)
            self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True) if kind == "clip" else None
        except (OSError, ValueError, KeyError) as e:
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ConfigError(f"eval.{kind}={path}: cannot be loaded as a {self.DESCRIBED[kind]}: {reason}") from e
        self.model.eval().to(device)

    @torch.no_grad()
    def images(self, images) -> torch.Tensor:
        rows = []
        pictures = _uint8_images(images)
        for start in range(0, len(pictures), self.batch_size):
            pixels = self.processor(images=pictures[start : start + self.batch_size], return_tensors="pt")
            pixels = pixels["pixel_values"].to(self.device, next(self.model.parameters()).dtype)
            if self.kind == "clip":
                rows.append(_pooled(self.model.get_image_features(pixel_values=pixels)))
            else:  # DINO's subject features: the CLS token of the last layer
                rows.append(self.model(pixel_values=pixels).last_hidden_state[:, 0])
        return torch.cat(rows).float().cpu()

    @torch.no_grad()
    def texts(self, texts: list[str]) -> torch.Tensor:
        longest = self.model.config.text_config.max_position_embeddings
        tokens = self.tokenizer(texts, padding=True, truncation=True, max_length=longest, return_tensors="pt")
        tokens = {k: v.to(self.device) for k, v in tokens.items() if k in ("input_ids", "attention_mask")}
        return _pooled(self.model.get_text_features(**tokens)).float().cpu()


def check_folder(path: str, kind: str) -> Path:
    """``eval.clip`` / ``eval.dino``: a local model folder (a ConfigError naming the key otherwise)."""
    folder = Path(path).expanduser()
    if not (folder / "config.json").is_file():
        raise ConfigError(
            f"eval.{kind}={path}: no {FeatureModel.DESCRIBED[kind]} there (config.json missing); give a local folder "
            "written by transformers' save_pretrained: nothing is downloaded"
        )
    return folder


def check(cfg) -> None:
    """The feature models' folders exist (before anything loads)."""
    for kind in ("clip", "dino"):
        if cfg.eval[kind]:
            check_folder(cfg.eval[kind], kind)


def available(cfg, judged: set[str] = frozenset()) -> set[str]:
    """The metrics a run of ``cfg`` can compute at its validation steps (for checks of checkpoints.select);
    ``judged``: what the embedded base's judge gives (subject_fidelity, class_preservation), if it has one."""
    d = cfg.data
    out = set()
    if d.val_split > 0 or d.val_dir:
        out.add("val_loss")
        if cfg.prior.enabled and d.val_split > 0:
            out.add("val_loss_class")
    if not d.instance_prompt:
        return out
    clip, dino, judge = bool(cfg.eval.clip), bool(cfg.eval.dino), bool(judged)
    if judge:
        out |= set(judged) | {"fidelity", "score"}
    if clip:
        out |= {"clip_i", "clip_t", "fidelity", "diversity", "score"}
    if dino:
        out |= {"dino", "fidelity", "diversity", "score"}
    if d.class_prompt and (judge or clip or dino):
        out.add("drift")
    if "class_preservation" in judged and d.class_prompt:
        out.add("preservation")
    return out


class Scorer:
    """Scores samples of the instance prompt and of the class prompt against the subject's real images.

    Args:
        references: the subject's images in [-1, 1] ((N, 3, H, W) or a list of (3, H, W)).
        instance_prompt, class_prompt: the prompts the samples were drawn with (class_prompt may be None).
        clip, dino: ``FeatureModel``s, or None.
        judge: the embedded base's ``Judge``, or None.
    """

    def __init__(self, references, instance_prompt: str, class_prompt: str | None, clip=None, dino=None, judge=None):
        self.instance_prompt, self.class_prompt = instance_prompt, class_prompt
        self.clip, self.dino, self.judge = clip, dino, judge
        self.refs = {m.kind: m.images(references) for m in (clip, dino) if m is not None}
        self.prompt_features = clip.texts([instance_prompt]) if clip is not None else None
        # drift uses the most telling model present
        self.drift_by = "judge" if judge is not None else "dino" if dino is not None else "clip"

    def class_similarity(self, class_images) -> float:
        """How much the class-prompt samples look like the subject (drift is this minus the base's)."""
        if self.drift_by == "judge":
            return float(np.mean(self.judge.is_subject(class_images)))
        model = self.dino if self.drift_by == "dino" else self.clip
        return mean_cosine(model.images(class_images), self.refs[model.kind])

    def score(self, instance_images, class_images=None, base_similarity: float | None = None) -> dict[str, float]:
        """The metrics of these samples; drift needs the base's ``class_similarity`` (None: no drift)."""
        out: dict[str, float] = {}
        if self.judge is not None:
            out["subject_fidelity"] = float(np.mean(self.judge.is_subject(instance_images)))
            kept = self.judge.is_class(class_images) if class_images is not None else None
            if kept is not None:
                out["class_preservation"] = out["preservation"] = float(np.mean(kept))
        if self.clip is not None:
            features = self.clip.images(instance_images)
            out["clip_i"] = mean_cosine(features, self.refs["clip"])
            out["clip_t"] = mean_cosine(features, self.prompt_features)
            out["diversity"] = 1 - self_similarity(features)
        if self.dino is not None:
            features = self.dino.images(instance_images)
            out["dino"] = mean_cosine(features, self.refs["dino"])
            out["diversity"] = 1 - self_similarity(features)
        out["fidelity"] = next(out[k] for k in ("subject_fidelity", "dino", "clip_i") if k in out)
        if class_images is not None:
            out["class_similarity"] = self.class_similarity(class_images)
            if base_similarity is not None:
                out["drift"] = out["class_similarity"] - base_similarity
        out["score"] = out["fidelity"] - max(out.get("drift", 0.0), 0.0)
        return out


_said_skipped = set()


def scorer(cfg, references, device, feature_models: dict | None = None, judge=None) -> Scorer | None:
    """The run's ``Scorer``: ``judge`` (the embedded base's), ``eval.clip`` and ``eval.dino`` where given; None
    (said once per process) when there is no instance prompt or nothing to score with.

    ``feature_models`` caches the loaded models across calls (validation and evaluate share them)."""
    d, e = cfg.data, cfg.eval
    if not d.instance_prompt:
        return None
    models = feature_models if feature_models is not None else {}
    for kind in ("clip", "dino"):
        if e[kind] and kind not in models:
            models[kind] = FeatureModel(e[kind], kind, device, cfg.model.allow_pickle)
    if judge is None and not models:
        if "features" not in _said_skipped:
            _said_skipped.add("features")
            print(
                "[tuner] metrics: skipped (clip_i, clip_t, dino, drift need a local feature model: "
                "eval.clip=PATH to a CLIP folder, eval.dino=PATH to a DINO / DINOv2 folder)",
                flush=True,
            )
        return None
    return Scorer(references, d.instance_prompt, d.class_prompt, models.get("clip"), models.get("dino"), judge)
