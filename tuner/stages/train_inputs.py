"""The train stage's frozen work, done once before the loop: the prepared sets read back, each image (and each
edit pair's reference images) encoded into latents and each caption into embeddings, through the shared cache
(tuner/training/cache.py), and split into what trains and what is held out for the validation loss.

    the prepared datasets (tuner/data/prepared.py)
    -> latents: the VAE's distribution of each image, cached by the image's bytes (tuner/training/batches.py)
    -> reference latents: the VAE's mean of each control, cached by its bytes and the family's rule
    -> caption embeddings, cached by the text (and, where the text encoder reads them, the references)
    -> the SampleSets the train stage hands the loop (tuner/training/setup.py)
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable

import torch

from tuner.data.apart import split
from tuner.data.prepare import load_prepared
from tuner.data.prepared import (
    control_keys,
    control_pixels,
    control_prompt_images,
    has_controls,
    image_keys,
    images_of,
    latent_masks,
    prompt_reference_keys,
)
from tuner.errors import ConfigError
from tuner.models.base import tree_map
from tuner.stages.context import Run
from tuner.training.batches import Captions, ControlLatents, LatentCache, SampleSet, encode_latent_dist
from tuner.training.cache import Store, cached, evict, fingerprint
from tuner.training.held_out import HeldOutSet
from tuner.training.setup import SampleSets

# captions the text encoders encode at once: T5-XXL takes 0.33 GB a caption at 512 tokens (tools/bench_memory.py)
PROMPTS_AT_ONCE = 1


def sample_sets(run: Run, in_step: bool, bring: Callable[..., None]) -> SampleSets:
    """The instance set (and the class set, with prior preservation), their latents and captions encoded
    once into the shared cache (tuner/training/cache.py), where any run finds them again by content; and the
    held-out images (``data.val_split`` of each set, or ``data.val_dir``), encoded the same way. ``bring(*names)``
    puts the named modules on the device before they encode anything.

    An edit family's pairs (``Family.REFERENCES``): each control's latents (the VAE's mean) go to the same store,
    keyed by the prepared control's bytes and the family's rule (``_controls``); where its text encoder reads the
    references, a prompt's row is its caption with its references, each with an empty caption's row of its own.

    Returns the sets, the distinct captions (the empty one last, for caption dropout), the held-out sets and each
    caption's conditioning (or token ids): a ``SampleSets``.
    """
    cfg, c, accelerator = run.cfg, run.components, run.accelerator
    roles = [("instance", 1.0)] + ([("class", cfg.prior.loss_weight)] if cfg.prior.enabled else [])
    kept, held_out, opened = [], [], []
    report, started = {"entries": {}, "encoded": {}}, time.perf_counter()
    caption_ids: dict = {}  # each distinct caption (with its references, for in_prompt families) is encoded once
    references = run.family.REFERENCES
    in_prompt = references is not None and references.in_prompt
    prompt_images: dict = {}  # in_prompt: a row's key -> its references as the text encoder reads them
    vae_dtype = next(c.vae.parameters()).dtype
    latents_store = Store(run.cache_dir, f"latents-{fingerprint('latents', str(vae_dtype), modules=[c.vae])}")
    for role, weight, dataset in _parts(run, roles):

        def latents_of(ids, dataset=dataset):
            bring("vae")
            return encode_latent_dist(c.vae, images_of(dataset, ids), family=run.family).items()

        entries, report["encoded"][f"latents-{role}"] = cached(
            latents_store, image_keys(dataset), latents_of, accelerator, f"{role} latents"
        )
        report["entries"][f"latents-{role}"] = len(entries)
        opened.append(entries)
        latents = LatentCache(entries.column("mean"), entries.column("std"), *run.family.latent_normalization(c.vae))
        controls = None
        if references is not None and has_controls(dataset):
            controls = _controls(run, role, dataset, latents_store, bring, report, opened)
        if in_prompt:  # a row per caption and references; the empty caption's with the same references too
            refs = prompt_reference_keys(dataset)
            images = control_prompt_images(dataset) if any(refs) else [[] for _ in refs]
            for key, pictures in zip(refs, images):
                prompt_images.setdefault(key, pictures)
            keys = list(zip(dataset["caption"], refs))
            for key in keys + [("", ref) for ref in refs]:
                caption_ids.setdefault(key, len(caption_ids))
        else:
            keys = dataset["caption"]
        captions = torch.tensor([caption_ids.setdefault(key, len(caption_ids)) for key in keys])
        mask, image_cond = latent_masks(dataset, latents), run.family.image_cond(dataset)
        if weight is None:  # a held-out part, named by the metric it gives
            held_out.append(HeldOutSet(HELD_OUT[role], latents, captions, image_cond, mask, controls))
            continue
        repeats, image_weight = list(dataset["repeats"]), torch.tensor(dataset["weight"])
        kept.append(dict(latents=latents, caption=captions, weight=weight, mask=mask, repeats=repeats,
                         image_weight=image_weight, image_cond=image_cond, controls=controls))  # fmt: skip
    empty = None
    if in_prompt:  # each row's empty caption is the row of "" with its references
        rows_of = list(caption_ids) + ([] if ("", "") in caption_ids else [("", "")])
        texts = [text for text, _ in rows_of]
        empty = torch.tensor([caption_ids.get(("", ref), len(rows_of) - 1) for _, ref in rows_of])
    else:
        rows_of = texts = list(caption_ids) + [""]
    if in_step:
        rows = run.family.tokenize(c, texts)
    else:
        store = Store(run.cache_dir, f"prompts-{_prompts_fingerprint(run)}")
        keys = [hashlib.sha256(text.encode()).hexdigest() for text in texts]
        if in_prompt:  # the caption and its references (their prepared bytes)
            keys = [hashlib.sha256(f"{text}\0{ref}".encode()).hexdigest() for text, ref in rows_of]

        def encode(ids):
            bring(*c.text_encoders)
            pictures = [prompt_images.get(rows_of[i][1], []) for i in ids] if in_prompt else None
            return encode_captions(run.family, c, [texts[i] for i in ids], accelerator.autocast, pictures)

        entries, report["encoded"]["prompts"] = cached(store, keys, encode, accelerator, "captions")
        report["entries"]["prompts"] = len(entries)
        names = list(entries.slots[0])
        rows = entries.column("embeds") if names == ["embeds"] else {k: entries.column(k) for k in names}
        opened.append(entries)
    report["seconds"] = round(time.perf_counter() - started, 3)
    run.metrics["cache"] = report | {"dir": str(run.cache_dir)}
    if run.is_main:
        counts = ", ".join(f"{k} {report['encoded'][k]} of {n}" for k, n in report["entries"].items())
        print(f"[tuner] cache: encoded {counts} in {report['seconds']:.1f} s ({run.cache_dir})", flush=True)
        if cfg.cache.max_gb is not None:  # once every store is open: never what this run reads
            removed = evict(run.cache_dir, cfg.cache.max_gb, keep=set().union(*(e.shards for e in opened)))
            if removed:
                print(f"[tuner] cache: removed {len(removed)} least recently used shards (cache.max_gb)", flush=True)
    d = cfg.data
    cond = Captions(
        texts, rows, d.caption_dropout, d.shuffle_tags, d.keep_tags, lambda t: run.family.tokenize(c, t), empty
    )
    return SampleSets([SampleSet(cond=cond, **k) for k in kept], texts, held_out, rows)


def _controls(run: Run, role: str, dataset, store: Store, bring, report: dict, opened: list) -> ControlLatents:
    """The latents of a part's controls (an edit family's pairs): the VAE's mean of each distinct prepared control,
    encoded once into the latents ``store`` (keyed by its bytes and ``References.rule()``), normalised at draw time
    as the target latents are."""
    c, family = run.components, run.family
    per_row = control_keys(dataset, family.REFERENCES.rule())
    unique = list(dict.fromkeys(key for row in per_row for key in row))
    where = {key: (i, k) for i, row in enumerate(per_row) for k, key in enumerate(row)}

    def latents_of(ids):
        bring("vae")
        pixels = [control_pixels(dataset, *where[unique[i]]) for i in ids]
        return [{"mean": item["mean"]} for item in encode_latent_dist(c.vae, pixels, family=family).items()]

    entries, report["encoded"][f"controls-{role}"] = cached(
        store, unique, latents_of, run.accelerator, f"{role} controls"
    )
    report["entries"][f"controls-{role}"] = len(entries)
    opened.append(entries)
    position = {key: i for i, key in enumerate(unique)}
    rows = [[position[key] for key in row] for row in per_row]
    return ControlLatents(entries.column("mean"), rows, *family.latent_normalization(c.vae))


# a held-out part's name in the cache report -> the metric its loss is
HELD_OUT = {"held-out instance": "val_loss", "held-out class": "val_loss_class", "val": "val_loss"}


def _parts(run: Run, roles: list[tuple[str, float]]) -> list[tuple[str, float | None, object]]:
    """(name, loss weight, prepared dataset) of each part of the data: each role's images kept for training and
    (weight None) its held-out ones, ``data.val_split`` of them chosen by seed; or ``data.val_dir``'s."""
    d, parts = run.cfg.data, []
    for role, weight in roles:
        if not (run.dir / "data" / role / "dataset").is_dir():
            raise ConfigError(f"train: no prepared {role} data in {run.dir / 'data'}; add the prepare stage first")
        dataset = load_prepared(run.dir / "data" / role)
        if d.val_split > 0:
            kept, held = split(len(dataset), d.val_split, run.cfg.seed, role)
            parts += [(role, weight, dataset.select(kept)), (f"held-out {role}", None, dataset.select(held))]
        else:
            parts.append((role, weight, dataset))
    if d.val_dir:
        if not (run.dir / "data" / "val" / "dataset").is_dir():
            raise ConfigError(f"train: data.val_dir is set but {run.dir / 'data' / 'val'} is not prepared; run prepare")
        parts.append(("val", None, load_prepared(run.dir / "data" / "val")))
    return parts


def _prompts_fingerprint(run: Run) -> str:
    """What a caption's embeddings depend on besides its text: the family, its text encoders' weights and
    tokenizers, the precision they run in, the prompt length and the encoders' quantization."""
    c, m = run.components, run.cfg.model
    settings = {"max_sequence_length": m.max_sequence_length, "quantize_text_encoders": m.quantize_text_encoders}
    vocabularies = [
        hashlib.sha256(json.dumps(sorted(t.get_vocab().items())).encode()).hexdigest() for t in c.tokenizers.values()
    ]
    precision = run.accelerator.mixed_precision
    encoders = list(c.text_encoders.values())
    return fingerprint("prompts", m.family, settings, vocabularies, precision, modules=encoders)


def encode_captions(family, c, texts: list[str], autocast, references=None) -> list[dict[str, torch.Tensor]]:
    """Each caption's embeddings (a dict per caption, on the host), ``PROMPTS_AT_ONCE`` captions at a time; with
    ``references`` (a list of PIL images per caption), a family's whose text encoder reads them too."""
    items = []
    for start in range(0, len(texts), PROMPTS_AT_ONCE):
        part = texts[start : start + PROMPTS_AT_ONCE]
        with autocast():
            if references is None:
                encoded = family.encode_prompts(c, part)
            else:
                encoded = family.encode_prompts_with_references(c, part, references[start : start + PROMPTS_AT_ONCE])
            rows = tree_map(lambda x: x.cpu(), encoded)
        if isinstance(rows, torch.Tensor):
            items += [{"embeds": row} for row in rows]
        else:
            items += [{k: v[i] for k, v in rows.items()} for i in range(len(part))]
    return items
