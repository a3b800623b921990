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

import json
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


# the model types (config.json's model_type) each key takes, and the parts of a model its features do not use
# (ViT's pooler: DINO's features are the last layer's CLS token)
MODEL_TYPES = {"clip": ("clip",), "dino": ("dinov2", "dinov2_with_registers", "dinov3_vit", "vit")}
UNUSED = {"clip": (), "dino": ("pooler.",)}


class FeatureModel:
    """A local CLIP (``kind="clip"``) or DINO / DINOv2 (``kind="dino"``) model: image features (and, for CLIP,
    text features), one row per image, on the CPU in float32.

    Every weight of the model must come from the folder: one it lacks (transformers would initialise it at
    random) or holds for no part of the model is refused by name."""

    DESCRIBED = {"clip": "CLIP model folder (transformers' CLIPModel)", "dino": "DINO or DINOv2 model folder"}

    def __init__(self, path: str, kind: str, device, allow_pickle: bool = False, batch_size: int = 32):
        from transformers import AutoImageProcessor, AutoModel, AutoTokenizer, CLIPModel

        folder = check_folder(path, kind, allow_pickle)
        self.kind, self.device, self.batch_size = kind, device, batch_size
        try:
            loader = CLIPModel if kind == "clip" else AutoModel
            # safetensors unless model.allow_pickle (then transformers reads .bin files with weights_only)
            self.model, info = loader.from_pretrained(
                folder, local_files_only=True, use_safetensors=not allow_pickle or None, output_loading_info=True
            )
            self.processor = AutoImageProcessor.from_pretrained(folder, local_files_only=True)
            self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True) if kind == "clip" else None
        except (OSError, ValueError, KeyError, RuntimeError) as e:  # RuntimeError: a weight of another shape
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ConfigError(f"eval.{kind}={path}: cannot be loaded as a {self.DESCRIBED[kind]}: {reason}") from e
        missing = sorted(k for k in info["missing_keys"] if not k.startswith(UNUSED[kind]))
        unexpected, mismatched = sorted(info["unexpected_keys"]), sorted(map(str, info["mismatched_keys"]))
        for names, what in ((missing, "lacks"), (unexpected, "holds, for no part of it,"), (mismatched, "misshapes")):
            if names:
                raise ConfigError(
                    f"eval.{kind}={path}: its weights file {what} {len(names)} of the {type(self.model).__name__}'s "
                    f"tensors ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''}): not a whole "
                    f"{self.DESCRIBED[kind]}; give one written by save_pretrained of the whole model"
                )
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


def check_folder(path: str, kind: str, allow_pickle: bool = False) -> Path:
    """``eval.clip`` / ``eval.dino``: a local model folder of that kind, before anything loads: its config.json (of a
    model type the key takes), its weights files (safetensors, read by their headers; ``allow_pickle``: or a .bin)
    holding every part of the model its config describes, and nothing else.

    Raises:
        ConfigError: naming the key, what is wrong with the folder, and the fix.
    """
    folder, described = Path(path).expanduser(), FeatureModel.DESCRIBED[kind]

    def refuse(what: str) -> ConfigError:
        return ConfigError(f"eval.{kind}={path}: {what}; give a local {described} written by transformers' "
                           "save_pretrained: nothing is downloaded")  # fmt: skip

    if not (folder / "config.json").is_file():
        raise refuse(f"no {described} there (config.json missing)")
    try:
        model_type = json.loads((folder / "config.json").read_text()).get("model_type")
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        raise refuse("its config.json does not parse") from None
    if model_type not in MODEL_TYPES[kind]:
        wanted = ", ".join(MODEL_TYPES[kind])
        raise refuse(f"its config.json describes a {model_type} model (model_type), not one of {wanted}")
    keys = _weight_keys(folder, allow_pickle, refuse)
    if keys is None:  # pickled weights (model.allow_pickle): their names are read when they load
        return folder
    expected, prefix = _parts(folder, kind, refuse)
    found = {_part(k.removeprefix(prefix)) for k in keys}
    missing = sorted(p for p in expected - found if not f"{p}.".startswith(UNUSED[kind]))
    if missing:
        raise refuse(f"its weights lack the {', '.join(missing)} of the {model_type} model its config.json describes")
    if found - expected:
        parts = ", ".join(sorted(found - expected))
        raise refuse(f"its weights hold {parts}, which the {model_type} model its config.json describes has not")
    return folder


def _part(name: str) -> str:
    """The part of a model a weight belongs to: its module path's first two names (``vision_model.encoder``)."""
    return ".".join(name.split(".")[:-1][:2]) or name


def _weight_keys(folder: Path, allow_pickle: bool, refuse) -> set[str] | None:
    """The tensor names of the folder's safetensors weights (sharded ones by their index), from their headers;
    None for pickled weights only (``allow_pickle``)."""
    from tuner.files import inside, safetensors_header

    files, index = [folder / "model.safetensors"], folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            files = [inside(folder, name, index) for name in names]  # only the folder's own files, no link
        except ConfigError as e:
            raise refuse(str(e)) from None
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError):
            raise refuse(f"its {index.name} does not parse") from None
    if not any(f.is_file() for f in files):
        if allow_pickle and any(folder.glob("pytorch_model*.bin")):
            return None
        raise refuse(f"no weights in it ({files[0].name} missing)")
    keys = set()
    for file in files:
        try:
            keys |= set(safetensors_header(file))
        except (ValueError, OSError) as e:
            raise refuse(f"its weights file {file.name} {e}" if file.is_file() else f"{file.name} is missing") from None
    return keys


def _parts(folder: Path, kind: str, refuse) -> tuple[set[str], str]:
    """The parts of the model folder's config.json describes (built on the meta device: no weight is read), and
    the prefix its weights may carry (transformers' ``base_model_prefix``)."""
    from transformers import AutoConfig, AutoModel, CLIPModel

    try:
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
        with torch.device("meta"):
            model = CLIPModel(config) if kind == "clip" else AutoModel.from_config(config)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise refuse(f"its config.json does not describe a model ({reason})") from None
    names = [n for n, _ in model.named_parameters()] + [n for n, _ in model.named_buffers()]
    return {_part(n) for n in names}, f"{model.base_model_prefix}."


def check(cfg) -> None:
    """The feature models' folders are whole models of their kind (before anything loads)."""
    for kind in ("clip", "dino"):
        if cfg.eval[kind]:
            check_folder(cfg.eval[kind], kind, cfg.model.allow_pickle)


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
