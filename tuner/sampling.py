"""Sampling with fixed seeds: one generator per image, so an image depends only on its prompt and
seed, never on what else shares its batch. Used by the gallery, class images and evaluation.

Edit families (tuner/models/references.py) draw an edit of a pair's control(s): ``sample_edits`` hands the
pipeline the controls as the user gave them (the files ``control_sources`` names), its own rule prepares them,
and draws at the size of the pair's target; ``edit_pairs`` are the pairs a run shows (validation, gallery)."""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image, ImageOps
from tqdm.auto import tqdm

from tuner.models.base import Family


@torch.no_grad()
def sample_images(
    pipe,
    prompts: list[str],
    seeds: list[int],
    resolution: int,
    steps: int = 25,
    guidance_scale: float = 3.0,
    batch_size: int = 64,
    desc: str | None = None,
    autocast=contextlib.nullcontext,
    negative_prompts: list[str] | None = None,
    width: int | None = None,
    decode=None,
    guidance=None,
    **call,
) -> torch.Tensor:
    """Images (N, 3, H, W) in [-1, 1] for ``prompts[i]`` sampled from ``seeds[i]``.

    ``resolution`` is the height (and the width unless ``width`` is given); ``call`` goes to the
    pipeline as is (an image-to-image pipeline's ``image`` and ``strength``, which take no size).
    The denoising runs under ``autocast`` (mixed precision); the VAE decodes outside it, in its own
    dtype (float32 unless asked), since half-precision VAE decoding is known to produce NaNs.
    An edit's ``call`` (``References.call``) holds the references as ``image`` and the size to draw at.
    ``decode(pipe, latents, height, width)``: the family's (``Family.decode``: Flux's latents come packed);
    ``guidance(scale)``: the call's guidance arguments (``Family.guidance_kwargs``), ``guidance_scale`` if None.
    """

    decode = decode or Family().decode
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    out = []
    for start in tqdm(range(0, len(prompts), batch_size), desc=desc, disable=desc is None, leave=False):
        chunk = slice(start, start + batch_size)
        with autocast():
            size = {"height": resolution, "width": width or resolution}
            if "image" in call and "height" not in call:  # the image's size, where the pipeline takes one
                takes = "height" in inspect.signature(pipe.__call__).parameters
                size = {"height": call["image"].height, "width": call["image"].width} if takes else {}
            if "height" in size and "max_area" in inspect.signature(pipe.__call__).parameters:
                size["max_area"] = size["height"] * size["width"]  # FluxKontextPipeline sizes by area (1 MP default)
            negative = {"negative_prompt": negative_prompts[chunk]} if negative_prompts else {}
            drawn = pipe(
                prompt=prompts[chunk],  # by name: Flux.2's pipelines take reference images first
                num_inference_steps=steps,
                **(guidance(guidance_scale) if guidance else {"guidance_scale": guidance_scale}),
                generator=[torch.Generator().manual_seed(s) for s in seeds[chunk]],
                output_type="latent",
                **negative,
                **(size | call),  # an edit's call names its size (the references are not its size)
            )
            latents = drawn.frames if hasattr(drawn, "frames") else drawn.images  # a video pipeline's are frames
        height, width_ = _drawn_size(call, resolution, width)
        images = decode(pipe, latents, height, width_)
        out.append(images.float().clamp(-1, 1).cpu())
    return torch.cat(out)


def _drawn_size(call: dict, resolution: int, width: int | None) -> tuple[int, int]:
    """(height, width) of what the pipeline drew: the given image's (image to image), else the asked one (an
    edit's call names its height; its width is ``width``)."""
    if "image" in call and "height" not in call:
        return call["image"].size[::-1]
    return call.get("height", resolution), width or resolution


@dataclass
class Pair:
    """An edit to draw: its prompt, its controls as the user gave them and (from a prepared pair) its target."""

    prompt: str
    controls: list[Image.Image]
    target: Image.Image | None = None  # the prepared target (its size is the edit's)
    label: str = ""  # what the page calls it (the target's file)
    sources: list[str] = field(default_factory=list)  # the controls' files


def open_control(path: str | Path, background=(255, 255, 255)) -> Image.Image:
    """A control file as the pipeline is handed it: read as prepare reads it (EXIF orientation, sRGB, transparency
    on ``background``), never resized (the pipeline applies its own rule) and never modified."""
    from tuner.data.images import _to_srgb_rgb

    with Image.open(Path(path).expanduser()) as image:
        return _to_srgb_rgb(ImageOps.exif_transpose(image), background)


def edit_call(references, controls: list[Image.Image], height: int, width: int) -> dict:
    """``references.call`` less its ``width`` (``sample_images`` takes that by name)."""
    call = references.call(controls, height, width)
    call.pop("width", None)
    return call


@torch.no_grad()
def sample_edits(pipe, references, pairs: list[Pair], seeds: list[int], resolution: int, **options):
    """Each pair's edits at ``seeds``: one pipeline call per pair, its controls given once (the pipeline shares
    them over the batch) through ``references.call`` (``Family.REFERENCES``), drawn at its target's size (else
    ``resolution`` square). Returns one (len(seeds), 3, H, W) tensor in [-1, 1] per pair (their sizes differ).
    ``options`` go to ``sample_images`` (steps, guidance_scale, autocast, decode, guidance, the family's call)."""
    out = []
    if references.batch is not None:  # its pipeline edits this many images a call at most
        options = options | {"batch_size": min(options.get("batch_size", references.batch), references.batch)}
    for pair in pairs:
        height, width = pair.target.size[::-1] if pair.target is not None else (resolution, resolution)
        call = edit_call(references, pair.controls, height, width)
        prompts = [pair.prompt] * len(seeds)
        out.append(sample_images(pipe, prompts, list(seeds), height, width=width, **(options | call)))
    return out


def edit_pairs(run_dir: Path, cfg, count: int) -> list[Pair]:
    """The pairs a run shows (the validation page, the gallery): up to ``count`` prepared pairs with controls, the
    held-out ones first (``data.val_split``'s, chosen as training chooses them, then ``data.val_dir``'s), then the
    first training ones. Each control is opened from its source (the prepared one where the file is gone)."""
    from tuner.data.apart import split
    from tuner.data.prepare import load_prepared

    held, kept = [], []
    for role in ("instance", "val"):
        if not (run_dir / "data" / role / "dataset").is_dir():
            continue
        dataset = load_prepared(run_dir / "data" / role)
        if "control_sources" not in dataset.column_names:
            continue
        with_controls = {i for i, c in enumerate(dataset["control_sources"]) if c}
        if role == "val":
            held += [(dataset, i) for i in sorted(with_controls)]
        elif cfg.data.val_split > 0:
            train, out = split(len(dataset), cfg.data.val_split, cfg.seed, role)
            held += [(dataset, i) for i in out if i in with_controls]
            kept += [(dataset, i) for i in train if i in with_controls]
        else:
            kept += [(dataset, i) for i in sorted(with_controls)]
    chosen = [(d, i, True) for d, i in held] + [(d, i, False) for d, i in kept]
    return [_pair(dataset, i, cfg.data.background, out) for dataset, i, out in chosen[:count]]


def _pair(dataset, i: int, background, held_out: bool) -> Pair:
    row = dataset[i]
    controls = []
    for k, source in enumerate(row["control_sources"]):
        if Path(source).expanduser().is_file():
            controls.append(open_control(source, tuple(background)))
        else:  # moved since prepare: the prepared control (the pipeline's rule applied twice changes little)
            print(f"[tuner] {source} is gone: its prepared copy stands in for it", flush=True)
            controls.append(row["controls"][k].convert("RGB"))
    label = (Path(row["source"]).name if row.get("source") else f"pair {i}") + (" (held out)" if held_out else "")
    return Pair(row["caption"], controls, row["image"].convert("RGB"), label, list(row["control_sources"]))


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] (N, 3, H, W) to uint8 (N, H, W, 3)."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)
