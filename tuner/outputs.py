"""The stages that use what a run trained (or what ``checkpoint=`` loaded): rank 0 runs them all.

    export -> gallery -> evaluate        after train, in a training recipe
    load_adapter -> gallery, evaluate    recipe=evaluate
    generate                             recipe=generate

They register themselves with ``tuner.run.stage`` like the stages in tuner/run.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import re
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from tqdm.auto import tqdm

from tuner import run_folder
from tuner.config import run_folder_of
from tuner.data import digits
from tuner.data.prepare import load_prepared
from tuner.errors import ConfigError
from tuner.export.formats import FORMATS
from tuner.files import write_atomic
from tuner.run import Run, _images, stage


def _live_tokens(run: Run) -> dict[str, torch.Tensor]:
    """Each new token's vectors (``<sks>`` plus diffusers' ``<sks>_1``, ... for more vectors), fp32 on the CPU."""
    c = run.components
    rows = run.accelerator.unwrap_model(c.text_encoder).get_input_embeddings().weight
    vocab = c.tokenizer.get_vocab()
    out = {}
    for token in run.new_tokens:
        extra = itertools.takewhile(lambda name: name in vocab, (f"{token}_{i}" for i in itertools.count(1)))
        ids = [vocab[token]] + [vocab[name] for name in extra]
        out[token] = rows[ids].detach().float().cpu().clone()
    return out


def _fp32_base(run: Run) -> dict[str, dict[str, torch.Tensor]]:
    """The base's fp32 weights where the live modules hold frozen ones in a lower precision (mixed precision)."""
    c = run.components
    low = [name for name, m in c.modules().items() if any(p.dtype != torch.float32 for p in m.parameters())]
    if not low:
        return {}
    fresh = run.family.load(run.model_path, allow_pickle=run.cfg.model.allow_pickle).modules()
    return {name: fresh[name].state_dict() for name in low}


def _export_info(run: Run, trained, name: str) -> dict:
    """What the metadata and the model card say: the base, the trigger and the training settings.

    Exporting a checkpoint (recipe=export), the settings come from the run folder the checkpoint sits in.
    """
    from importlib.metadata import version

    from tuner.export.metadata import folder_hash, tag_frequency

    cfg, source, source_dir = run.cfg, run.cfg, run.dir
    if run.trainables is None:
        source = None
        checkpoint = cfg.checkpoint
        for _ in range(4):  # an export of an export: follow the checkpoints back to the run that trained
            folder = run_folder_of(checkpoint) if checkpoint else None
            if folder is None:
                break
            config = OmegaConf.load(folder / "config.yaml")
            if "train" in config.stages:
                source, source_dir = config, folder
                break
            checkpoint = config.checkpoint
    e = cfg.export
    info = {
        "name": name,
        "base_name": str(run.model_path) if e.include_paths else run.model_path.name,
        "base_hash": folder_hash(run.model_path),
        "base_version": run.family.BASE_VERSION,
        "architecture": f"{run.family.MODELSPEC_ARCHITECTURE}/{'lora' if trained.adapter else 'checkpoint'}",
        "prediction_type": run.components.prediction_type,
        "version": version("tuner"),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "description": f"trained with tuner {version('tuner')}" if source is not None else None,
        "adapter": trained.adapter,
        "tokens": list(trained.tokens),
    }
    if source is not None:
        t, d = source.train, source.data
        info.update(
            resolution=d.resolution,
            steps=t.max_steps,
            learning_rate=t.learning_rate,
            unet_lr=t.learning_rate,
            text_encoder_lr=(source.text_encoder.learning_rate or t.learning_rate)
            if source.text_encoder.train != "none"
            else None,
            seed=source.seed,
            batch_size=t.batch_size,
            optimizer=t.optimizer,
            lr_scheduler=t.lr_scheduler,
            mixed_precision=t.mixed_precision,
            noise_offset=t.noise_offset or None,
            snr_gamma=t.snr_gamma,
            rank=source.adapter.rank if trained.adapter else None,
            alpha=source.adapter.alpha if trained.adapter else None,
            adapter_type=source.adapter.type,
            text_encoder=source.text_encoder.train,
            trigger=", ".join(trained.tokens) or d.trigger or d.instance_prompt,
            instance_prompt=d.instance_prompt,
            started=getattr(run, "started", None) if source is cfg else None,
            finished=time.strftime("%Y-%m-%dT%H:%M:%S%z") if source is cfg else None,
        )
        captions = {}
        for role in ("instance", "class"):
            if (source_dir / "data" / role / "dataset").is_dir():
                captions[role] = list(load_prepared(source_dir / "data" / role)["caption"])
        if captions:
            info["tag_frequency"] = tag_frequency(captions)
            info["num_images"] = len(captions.get("instance", []))
            info["num_class_images"] = len(captions.get("class", [])) or None
    return info


@stage(main_only=True, writes=(*FORMATS, "README.md"))
def export(run: Run) -> None:
    """Write what trained (or what ``checkpoint=`` loaded) in every format of ``export.formats``.

    See tuner/export/formats.py for the formats and what each holds; a format that cannot hold a
    part (a kohya file cannot hold a DoRA adapter) says so and writes the rest. The run summary
    lists every file written with its sha256; ``README.md`` in the run folder is the model card.
    """
    from tuner.export import formats
    from tuner.export.card import write_model_card
    from tuner.export.metadata import file_hashes, training_metadata

    cfg, c, e = run.cfg, run.components, run.cfg.export
    if run.trainables is None and cfg.checkpoint and "load_adapter" not in cfg.stages:
        load_adapter(run)  # recipe=export checkpoint=PATH
    what = run.trainables
    base_weights = what.base_weights_train if what is not None else not (cfg.checkpoint or "train" in cfg.stages)
    trained = formats.Trained(c, formats.adapter_kind(c), _live_tokens(run), base_weights)
    parts = trained.parts
    if not parts:
        raise ConfigError("export: nothing to export; put train (or load_adapter with checkpoint=PATH) before it")
    formats.check_held(parts, e.formats)
    formats.check_finite(trained)
    name = e.name or run.dir.name
    info = _export_info(run, trained, name)
    metadata = training_metadata(info)
    dtype = formats.DTYPES[e.dtype]
    merged, written = None, []
    for fmt in tqdm(e.formats, desc="export", leave=False):
        folder = run.dir / fmt
        held = parts & formats.HOLDS[fmt]
        if not held:
            print(f"[tuner] export {fmt}: skipped, it cannot hold {', '.join(sorted(parts))}", flush=True)
            run_folder.remove(run.dir, fmt)  # an earlier run's files in this folder must not pass for this run's
            continue
        if parts - held:
            print(f"[tuner] export {fmt}: without {', '.join(sorted(parts - held))} (another format holds it)")
        if fmt == "diffusers":
            formats.write_diffusers(trained, folder, run.family, dtype)
        elif fmt == "kohya":
            formats.write_kohya(trained, folder, name, run.family, dtype, metadata)
        elif fmt == "peft":
            formats.write_peft(trained, folder, dtype)
        else:
            if merged is None:
                print("[tuner] export: fusing the adapter into the base weights", flush=True)
                merged = formats.merged_components(trained, _fp32_base(run))
            if fmt == "merged":
                formats.write_merged(merged, folder, run.family, run.model_path, c.tokenizers, e.variant)
            else:
                vocab = {
                    te: json.loads((run.model_path / te / "config.json").read_text())["vocab_size"]
                    for te in c.text_encoders
                }
                single_dtype = formats.DTYPES[e.single_file_dtype]
                formats.write_single_file(merged, folder, name, run.family, vocab, single_dtype, metadata)
        written.append(folder)
        run.outputs[fmt] = str(folder)
    del merged
    files = {}
    for path in sorted(p for folder in written for p in folder.rglob("*") if p.is_file()):
        sha256, model_hash = file_hashes(path)
        files[str(path.relative_to(run.dir))] = {"bytes": path.stat().st_size, "sha256": sha256} | (
            {"model_hash": model_hash} if model_hash else {}
        )
    run.files = files
    card = write_model_card(run.dir / "README.md", info, files, cfg, run.family)
    run.outputs["model_card"] = str(card)


@stage(main_only=True)
def load_adapter(run: Run) -> None:
    """Load an adapter made by tuner or another trainer (``checkpoint=PATH``) onto the base."""
    path = Path(run.cfg.checkpoint).expanduser()
    loaded = load_checkpoint(run, path)
    print(f"[tuner] loaded {', '.join(loaded)} from {path}", flush=True)
    run.outputs["checkpoint"] = str(path)


def load_checkpoint(run: Run, path: Path, adapter_name: str | None = None) -> list[str]:
    """Load what ``path`` holds onto the run's pipeline; returns what was loaded.

    ``path`` may be a run folder (its diffusers/ export, else peft/, else kohya/), a format folder
    (diffusers/, kohya/, peft/), a LoRA ``.safetensors`` in diffusers' or kohya's keys, or an
    embedding ``.safetensors`` (diffusers' ``{token: vectors}`` or A1111's ``emb_params``). Adapters
    load under ``adapter_name`` (diffusers picks one when it is None).
    """

    folders = [path]
    if path.is_dir() and (path / "summary.json").is_file():  # a run: its diffusers/ export, with peft/ for
        folders = [path / x for x in ("diffusers", "peft") if (path / x).is_dir()]  # what diffusers cannot hold
        if (path / "diffusers" / "pytorch_lora_weights.safetensors").is_file():
            folders = [path / "diffusers"]
        folders = folders or [path / "kohya"]
    loaded = []
    for folder in folders:
        loaded += _load_folder(run, folder, adapter_name)
    if not loaded:
        raise ConfigError(
            f"{path}: no adapter in it (a LoRA or embedding .safetensors, a diffusers/, kohya/ or peft/ "
            "folder, or a run folder)"
        )
    return loaded


def _candidates(path: Path) -> list[Path]:
    """The adapter and embedding files of a folder (or the file itself): its .safetensors, else any file
    that may hold tensors under another name (a safetensors named .bin loads; a pickle is refused)."""
    from tuner.export.reading import PICKLE_SUFFIXES

    if path.is_file():
        return [path]
    files = sorted(path.glob("*.safetensors")) + sorted(path.glob("embeddings/*.safetensors"))
    return files or sorted(p for p in path.iterdir() if p.is_file() and p.suffix in PICKLE_SUFFIXES)


def _load_folder(run: Run, path: Path, adapter_name: str | None) -> list[str]:
    from tuner.export import reading

    loaded = []
    for file in _candidates(path):
        tensors, meta = reading.read_tensors(file)
        keys = list(tensors)
        if reading.lora_modules(tensors) or any(k.endswith(up) for _, up in reading.LORA_PAIRS for k in keys):
            _load_lora(run, file, reading.check_lora(file, tensors, meta), adapter_name)
        elif any(k.startswith(("hada_", "lokr_")) or ".hada_" in k or ".lokr_" in k for k in keys):
            raise ConfigError(
                f"{file}: a LoHa/LoKr file in kohya's keys; diffusers cannot load it, load the run's peft/ folder"
            )
        else:  # an embedding: diffusers' {token: vectors} or A1111's emb_params, named by its file
            widths = [te.get_input_embeddings().weight.shape[1] for te in run.components.text_encoders.values()]
            reading.check_embedding(file, tensors, widths)
            token = meta.get("token") or (keys[0] if len(keys) == 1 and keys[0] != "emb_params" else file.stem)
            if token in run.pipe.tokenizer.get_vocab():
                raise ConfigError(f"{file}: its token {token} is in the vocabulary already (another adapter's?)")
            with _named_failures(file, "an embedding"):
                run.pipe.load_textual_inversion(file, token=token)
            run.new_tokens.append(token)
            run.base_weights_changed = True
        loaded.append(file.name)
    for component, module in run.components.trainable().items():
        if (path / component / "adapter_config.json").is_file():
            _load_peft(module, path / component, adapter_name or "default")
            loaded.append(f"{component} (peft)")
    return loaded


@contextlib.contextmanager
def _named_failures(file: Path, what: str):
    """A loader's failure on a file that passed the checks (a shape that fits no module of this base, ...)
    as one line naming the file."""
    try:
        yield
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError, AttributeError, OSError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"{file}: does not load as {what} onto this base ({reason[:300]})") from None


def _adapter_layers(run: Run) -> int:
    """How many (module, adapter) pairs of LoRA layers the run's modules hold."""
    from tuner.export.formats import tuner_layers

    return sum(
        len(getattr(layer, "lora_A", {}))
        for module in run.components.trainable().values()
        for layer in tuner_layers(module).values()
    )


def _load_lora(run: Run, file: Path, modules: int, adapter_name: str | None) -> None:
    """Load a LoRA file through the pipeline's own ``load_lora_weights``; every module of the file must land.

    Raises:
        ConfigError: the file does not load, or some of its modules name modules this base does not have
            (a LoRA for another model), listing them.
    """
    import logging

    class Keep(logging.Handler):
        def __init__(self):
            super().__init__(logging.WARNING)
            self.messages = []

        def emit(self, record):
            self.messages.append(record.getMessage())

    before, keep = _adapter_layers(run), Keep()
    watched = [logging.getLogger(name) for name in ("diffusers", "peft")]
    saved = [(logger.level, logger.handlers, logger.propagate) for logger in watched]
    for logger in watched:  # diffusers names the keys it could not place only in a warning: kept, not printed
        logger.setLevel(logging.WARNING)
        logger.handlers, logger.propagate = [keep], False
    try:
        with _named_failures(file, "a LoRA"), tempfile.TemporaryDirectory() as named:
            source = file
            if file.suffix != ".safetensors":  # diffusers picks its reader by the name: a link named as it is
                source = Path(named) / "lora.safetensors"
                source.symlink_to(file.resolve())
            run.pipe.load_lora_weights(source.parent, weight_name=source.name, adapter_name=adapter_name)
    finally:
        for logger, (level, handlers, propagate) in zip(watched, saved):
            logger.setLevel(level)
            logger.handlers, logger.propagate = handlers, propagate
    landed = _adapter_layers(run) - before
    if landed < modules:
        from tuner.export.reading import unexpected_keys

        keys = unexpected_keys(keep.messages)
        shown = f": {', '.join(keys[:4])}{' ...' if len(keys) > 4 else ''}" if keys else ""
        raise ConfigError(
            f"{file}: {modules - landed} of its {modules} LoRA modules name modules this base does not have"
            f"{shown}; is it a LoRA for another model (model.path={run.cfg.model.path or 'the digits base'})?"
        )


def _load_peft(module, folder: Path, adapter_name: str) -> None:
    """A peft adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``) onto ``module``."""
    from peft import PeftConfig, set_peft_model_state_dict

    from tuner.export import reading

    weights = folder / "adapter_model.safetensors"
    if not weights.is_file():
        pickled = [p for p in folder.iterdir() if p.suffix in reading.PICKLE_SUFFIXES]
        if pickled and reading.is_pickle(pickled[0]):
            reading.refuse_pickle(pickled[0])
        if not pickled:
            raise ConfigError(f"{folder}: adapter_config.json without adapter_model.safetensors beside it")
        weights = pickled[0]  # a safetensors file under a .bin name
    tensors, _ = reading.read_tensors(weights)
    try:
        config = PeftConfig.from_pretrained(folder)
    except (ValueError, TypeError, KeyError) as e:
        raise ConfigError(f"{folder / 'adapter_config.json'}: not a peft adapter config ({e})") from None
    state = {k.removeprefix("base_model.model."): v for k, v in tensors.items()}
    with _named_failures(weights, "a peft adapter"):
        module.add_adapter(config, adapter_name=adapter_name)
        result = set_peft_model_state_dict(module, state, adapter_name=adapter_name)
    unused = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k or "hada_" in k or "lokr_" in k]
    if unused:
        raise ConfigError(f"{weights}: {len(unused)} adapter tensors fit no module, e.g. {unused[:3]}")


def _with_and_without_adapter(run: Run, prompts, seeds, steps, guidance, desc):
    """Sample the same prompts and seeds from the base and from the fine-tuned model.

    With only peft adapters trained, the base is the same model with its adapters switched off; when
    base weights or the vocabulary changed, it is a fresh copy of the base, loaded for this and freed.
    """
    c = run.components
    adapted = [m for m in c.trainable().values() if getattr(m, "peft_config", None)]
    if not adapted and not run.base_weights_changed:
        raise ConfigError("gallery/evaluate need an adapter: put train or load_adapter (checkpoint=PATH) before them")
    if run.base_weights_changed:
        base = run.family.load(run.model_path, run.cfg.model.prediction_type, run.cfg.model.allow_pickle)
        base_pipe = run.family.pipeline(base)
        base_pipe.to(run.accelerator.device)
        base_images = run.sample(prompts, seeds, steps, guidance, desc=f"{desc} (base)", pipe=base_pipe)
        del base_pipe
    else:
        for module in adapted:
            module.disable_adapters()
        base_images = run.sample(prompts, seeds, steps, guidance, desc=f"{desc} (base)")
        for module in adapted:
            module.enable_adapters()
    tuned_images = run.sample(prompts, seeds, steps, guidance, desc=f"{desc} (fine-tuned)")
    return base_images, tuned_images


@stage(main_only=True, writes=("gallery",))
def gallery(run: Run) -> None:
    """Base vs fine-tuned, for the instance prompt and the class prompt, at fixed seeds."""
    from tuner.export.gallery import write_gallery

    d, s = run.cfg.data, run.cfg.sample
    seeds = list(s.seeds)
    prompts = list(s.prompts) or [p for p in (d.instance_prompt, d.class_prompt) if p]
    every_prompt = [prompt for prompt in prompts for _ in seeds]
    base_images, tuned_images = _with_and_without_adapter(
        run, every_prompt, seeds * len(prompts), s.steps, s.guidance_scale, "gallery"
    )
    rows = []
    for k, prompt in enumerate(prompts):
        cells = slice(k * len(seeds), (k + 1) * len(seeds))
        rows += [(f"base: {prompt}", base_images[cells]), (f"fine-tuned: {prompt}", tuned_images[cells])]
    run.outputs["gallery"] = str(write_gallery(run.dir / "gallery", rows, seeds, s.display_size))


def digit_in(prompt: str | None) -> int | None:
    """The digit a prompt names in words (``... digit seven`` -> 7), if any."""
    words = re.findall(r"[a-z]+", (prompt or "").lower())
    found = [digits.WORDS.index(w) for w in words if w in digits.WORDS]
    return found[-1] if found else None


@stage(main_only=True, writes=("metrics.json",))
def evaluate(run: Run) -> None:
    """Digits base: subject fidelity and class preservation, scored by an independent classifier.

    The classifier is an SVC fit on the real digits plus the instance images as an eleventh class.
    Subject fidelity is the share of instance-prompt samples classified as the subject; class
    preservation the share of class-prompt samples still classified as the digit the prompt names.
    """
    if run.cfg.model.path or run.cfg.model.builtin != "digits":
        print("[tuner] evaluate: digit metrics apply to the embedded digits base only; skipped")
        return
    d, e = run.cfg.data, run.cfg.eval
    instance = torch.stack(_images(load_prepared(run.dir / "data" / "instance")))
    classifier = digits.DigitClassifier(d.resolution, extra_images=instance, extra_label=10)
    seeds = [e.seed + i for i in range(e.samples)]
    scored = [
        (name, prompt, label)
        for name, prompt, label in (
            ("subject_fidelity", d.instance_prompt, 10),
            ("class_preservation", d.class_prompt, digit_in(d.class_prompt)),
        )
        if prompt is not None and label is not None
    ]
    prompts = [prompt for _, prompt, _ in scored for _ in seeds]
    base_images, tuned_images = _with_and_without_adapter(
        run, prompts, seeds * len(scored), e.steps, e.guidance_scale, "evaluate"
    )
    metrics = {}
    for k, (name, _, label) in enumerate(scored):
        cells = slice(k * e.samples, (k + 1) * e.samples)
        metrics[name] = float(np.mean(classifier.predict(tuned_images[cells]) == label))
        metrics[f"{name}_base"] = float(np.mean(classifier.predict(base_images[cells]) == label))
    run.metrics.update(metrics)
    write_atomic(run.dir / "metrics.json", json.dumps(metrics, indent=2))
    run.outputs["metrics"] = str(run.dir / "metrics.json")


# ---------------------------------------------------------------- serving


@stage(main_only=True, writes=("images",))
def generate(run: Run) -> None:
    """Images from the base plus ``generate.adapters`` (each at its weight, diffusers' ``set_adapters``),
    for ``generate.prompts`` and the lines of ``generate.prompt_file``; see tuner/generate.py.

    Writes ``images/NNNN-seedS.png`` (the settings in the PNG's ``parameters`` text, as A1111 does),
    ``images/images.jsonl`` (one line of settings per image) and ``images/index.html``.
    """
    from tuner import generate as gen
    from tuner.export.gallery import write_image_page

    cfg, g = run.cfg, run.cfg.generate
    jobs = gen.make_jobs(g, cfg.data.resolution)
    names, weights = [], []
    for k, a in enumerate(g.adapters):
        name = f"adapter{k}"
        loaded = load_checkpoint(run, Path(a.path).expanduser(), adapter_name=name)
        print(f"[tuner] {name} = {a.path} at weight {a.weight}: {', '.join(loaded)}", flush=True)
        if any(name in adapters for adapters in run.pipe.get_list_adapters().values()):  # not only embeddings
            names.append(name)
            weights.append(a.weight)
    if names:
        run.pipe.set_adapters(names, weights)
    pipe = run.family.img2img(run.pipe) if g.init_image else run.pipe
    folder, entries = run.dir / "images", []
    run_folder.remove(run.dir, "images")  # an earlier try's images in this run folder would mix with these
    bar = tqdm(total=len(jobs), desc="generate")
    for batch in gen.batches(jobs, g.batch_size):
        first = batch[0][1]
        pipe.scheduler = gen.scheduler(first.scheduler, run.components.noise_scheduler.config)
        init, call = None, {}
        if g.init_image:
            init = gen.load_init_image(g.init_image, first.width, first.height)
            call = {"image": init, "strength": g.strength}
        images = run.sample_with(pipe, [j for _, j in batch], call)
        for (i, job), image in zip(batch, gen.to_pil(images)):
            image = gen.post_process(image, g.post, init)
            settings = {**dataclasses.asdict(job), "adapters": [dict(a) for a in g.adapters]}
            if g.init_image:
                settings.update(init_image=Path(g.init_image).name, strength=g.strength)
            name = f"{i:04d}-seed{job.seed}.png"
            write_atomic(folder / name, _png_with_parameters(image, job, g.post.upscale))
            entries.append({"file": name, **settings})
        bar.update(len(batch))
    bar.close()
    write_atomic(folder / "images.jsonl", "".join(json.dumps(e) + "\n" for e in entries))
    run.outputs["images"] = str(write_image_page(folder, entries))


A1111_SAMPLERS = {
    "ddim": "DDIM",
    "ddpm": "DDPM",
    "euler": "Euler",
    "euler_a": "Euler a",
    "dpm++": "DPM++ 2M",
    "dpm++_karras": "DPM++ 2M Karras",
    "pndm": "PLMS",
}


def _png_with_parameters(image, job, upscale: int) -> bytes:
    """PNG bytes with A1111's ``parameters`` text chunk, so the settings travel with the image."""
    import io

    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    text = job.prompt + (f"\nNegative prompt: {job.negative}" if job.negative else "")
    text += (
        f"\nSteps: {job.steps}, Sampler: {A1111_SAMPLERS[job.scheduler]}, CFG scale: {job.guidance}, "
        f"Seed: {job.seed}, Size: {job.width}x{job.height}" + (f", Upscale: {upscale}" if upscale > 1 else "")
    )
    info.add_text("parameters", text)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()
