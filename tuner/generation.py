"""``recipe=generate``: images from a base plus adapters, for serving and for looking at what was learned.

Prompts come from ``generate.prompts`` and from a prompt file in kohya's sample-prompt format, one
prompt per line with options after it (``#`` starts a comment line)::

    a photo of sks dog on a beach --n blurry, lowres --w 512 --h 768 --d 42 --l 6.5 --s 30 --ss euler_a

``--n`` negative prompt, ``--w``/``--h`` size, ``--d`` seed, ``--l`` guidance scale, ``--s`` steps,
``--ss`` scheduler. Unset options take the ``generate.*`` defaults; with no sampler named (``--ss``,
``generate.scheduler``) an image is drawn with the base's own scheduler (``tuner.models.samplers.default``).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter

from tuner.config import SEED_MAX
from tuner.errors import ConfigError
from tuner.models import family_names, get_family
from tuner.models.samplers import Default, schedulers
from tuner.numbers import MAX_SIDE
from tuner.sampling import to_uint8

# the fewest steps a named sampler runs (PNDM's Runge-Kutta warm-up takes 4 when the base does not skip it); the
# base's own sampler: as its config says (``Default.fewest_steps``)
MIN_STEPS = {"pndm": 4}


OPTIONS = {"n": "negative", "w": "width", "h": "height", "d": "seed", "l": "guidance", "s": "steps", "ss": "scheduler"}


@dataclass(frozen=True)
class Job:
    """One image to draw, with every setting it is drawn with."""

    prompt: str
    negative: str
    width: int
    height: int
    seed: int
    guidance: float
    steps: int
    scheduler: str  # tuner's short name, or the class of the base's own scheduler (samplers.default)
    # where the sampler came from: "base" (the base folder's own), "family" (the family's default: the base's
    # cannot serve), "generate.scheduler", "--ss" (the prompt line's); "" before the base is known
    scheduler_from: str = ""

    def settings(self) -> tuple:
        """What images must share to go through the pipeline in one batch."""
        return (self.width, self.height, self.guidance, self.steps, self.scheduler)


def parse_prompt_line(line: str, where: str) -> tuple[str, dict]:
    """``prompt --key value ...`` -> (prompt, {option name: text}); unknown options raise naming ``where``."""
    parts = re.split(r"(?:^|\s)--(\w+)\s*", line)
    prompt, options = parts[0].strip(), {}
    for key, value in zip(parts[1::2], parts[2::2]):
        if key not in OPTIONS:
            raise ConfigError(f"{where}: unknown option --{key}; known: {', '.join('--' + k for k in OPTIONS)}")
        options[OPTIONS[key]] = value.strip()
    return prompt, options


def read_prompt_file(path: Path) -> list[tuple[str, dict, str]]:
    """Every prompt line of a kohya-style prompt file as (prompt, options, "file:line"); the file must be UTF-8."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"generate.prompt_file={path}: cannot read it ({e.strerror})") from None
    try:
        text = data.decode("utf-8-sig")  # a byte-order mark some editors write is not part of the prompt
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise ConfigError(
            f"generate.prompt_file={path}:{line}: not UTF-8 text (byte 0x{data[e.start]:02x}); save the file as UTF-8"
        ) from None
    out = []
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip() and not line.lstrip().startswith("#"):
            where = f"{path}:{number}"
            out.append((*parse_prompt_line(line, where), where))
    return out


def check(cfg) -> None:
    """``generate``'s settings, before anything loads: prompts, sizes, files, and every prompt line.

    Raises:
        ConfigError: naming the key (or the prompt file's line) and the fix.
    """
    g = cfg.generate
    if not g.prompts and not g.prompt_file:
        raise ConfigError(
            'generate: no prompt; pass generate.prompts=["a photo of sks dog"] or generate.prompt_file=FILE'
        )
    offered = schedulers(get_family(cfg.model.family, cfg.model))
    if g.scheduler is not None and g.scheduler not in offered:
        raise ConfigError(
            f"generate.scheduler={g.scheduler}: model={cfg.model.family} samples with {', '.join(offered)}"
        )
    for key in ("width", "height"):
        if g[key] is not None and not (8 <= g[key] <= MAX_SIDE and g[key] % 8 == 0):
            raise ConfigError(f"generate.{key}={g[key]}: a multiple of 8 from 8 to {MAX_SIDE} (or null)")
        if g[key] is None and cfg.data.resolution > MAX_SIDE:
            raise ConfigError(
                f"data.resolution={cfg.data.resolution}: generate draws at most {MAX_SIDE} px a side; "
                f"set generate.{key}"
            )
    if g.post.color_correct and not g.init_image:
        raise ConfigError("generate.post.color_correct matches colours to generate.init_image: set one, or turn it off")
    for k, a in enumerate(g.adapters):
        if not Path(a.path).expanduser().exists():
            raise ConfigError(f"generate.adapters[{k}].path={a.path}: no such file or folder")
    for key in ("prompt_file", "init_image"):
        if g[key] and not Path(g[key]).expanduser().is_file():
            raise ConfigError(f"generate.{key}={g[key]}: no such file")
    if g.refiner:
        if g.init_image:
            raise ConfigError(
                "generate.refiner with generate.init_image: choose one (image-to-image or base + refiner)"
            )
        check_refiner(cfg.model.family, g.refiner, "generate.refiner")
    jobs = make_jobs(g, cfg.data.resolution, offered)  # every prompt line checked before anything loads
    family = get_family(cfg.model.family, cfg.model)
    if family.NEGATIVE_PROMPT_REFUSAL and any(j.negative for j in jobs):
        raise ConfigError(
            f"generate.negative_prompt (or a prompt line's --negative): model={cfg.model.family}'s pipeline "
            f"({family.PIPELINE}) takes no negative prompt ({family.NEGATIVE_PROMPT_REFUSAL}); leave it empty"
        )


def refiner_families() -> list[str]:
    """The families a refiner can follow: those that name a refiner's pipeline (``REFINER_PIPELINE``)."""
    return [name for name in family_names() if get_family(name).REFINER_PIPELINE]


def check_refiner(family: str, path: str, key: str) -> None:
    """``key`` (generate.refiner, sample.refiner) names a local refiner folder, after the base of a family that
    takes one: its model_index.json names the refiner's pipeline and, for each component the pipeline needs, a
    class that fits and a folder beside it (the family's ``REFINER_PIPELINE`` and ``REFINER_COMPONENTS``)."""
    fam = get_family(family)
    if not fam.REFINER_PIPELINE:
        takes = " or ".join(f"model={name}" for name in refiner_families()) or "no family tuner knows"
        raise ConfigError(f"{key}: a refiner follows a base of {takes}, not model={family}")
    folder = Path(path).expanduser()
    try:
        index = json.loads((folder / "model_index.json").read_text())
    except (OSError, ValueError):
        index = None
    if not isinstance(index, dict) or index.get("_class_name") != fam.REFINER_PIPELINE:
        raise ConfigError(
            f"{key}={path}: not a local SDXL refiner folder ({fam.REFINER_PIPELINE} in its "
            "model_index.json), e.g. stable-diffusion-xl-refiner-1.0 saved with diffusers"
        )
    for name, classes in fam.REFINER_COMPONENTS.items():
        entry = index.get(name)
        named = entry[1] if isinstance(entry, list) and len(entry) == 2 and isinstance(entry[1], str) else None
        if named is None:
            raise ConfigError(f"{key}={path}: its model_index.json has no {name}, which {fam.REFINER_PIPELINE} needs")
        if classes is not None and named not in classes or classes is None and not named.endswith("Scheduler"):
            wanted = " or ".join(classes) if classes else "a scheduler"
            raise ConfigError(
                f"{key}={path}: its {name} is {named} in model_index.json; {fam.REFINER_PIPELINE} needs {wanted}"
            )
        if not (folder / name).is_dir():
            raise ConfigError(f"{key}={path}: no {name}/ folder, which its model_index.json lists")


def refine(base, refiner, jobs, start: float, decode, **call) -> torch.Tensor:
    """SDXL base then refiner (diffusers' "ensemble of expert denoisers"): the base draws the first ``start`` of
    the steps and hands its latents over, the refiner the rest; one generator per image and seed for each.
    Returns images (N, 3, H, W) in [-1, 1]."""
    first = jobs[0]
    prompts, seeds = [j.prompt for j in jobs], [j.seed for j in jobs]
    negative = {"negative_prompt": [j.negative for j in jobs]} if any(j.negative for j in jobs) else {}
    settings = {"num_inference_steps": first.steps, "guidance_scale": first.guidance, **negative}
    latents = base(
        prompts, height=first.height, width=first.width, denoising_end=start, output_type="latent",
        generator=[torch.Generator().manual_seed(s) for s in seeds], **settings, **call,
    ).images  # fmt: skip
    refined = refiner(
        prompts, image=latents, denoising_start=start, output_type="latent",
        generator=[torch.Generator().manual_seed(s) for s in seeds], **settings, **call,
    ).images  # fmt: skip
    return decode(refiner, refined, first.height, first.width).float().clamp(-1, 1).cpu()


CALLBACK_PARAMS = ("pipe", "step", "timestep", "callback_kwargs")  # diffusers' callback_on_step_end


def user_callback(value: str):
    """``generate.callback``: the user's function, ``path/to/file.py:function`` or an installed
    ``package.module.function``, checked before any of it runs (tuner/user_code.py).

    Raises:
        ConfigError: no such function, a place tuner does not import from, or a signature that does not take
            ``(pipe, step, timestep, callback_kwargs)``.
    """
    from tuner.user_code import load_function

    return load_function("generate.callback", value, CALLBACK_PARAMS)


def step_callbacks(every: int, user, on_preview) -> dict:
    """diffusers' ``callback_on_step_end`` for one batch's pipeline calls: the user's function, then every
    ``every`` steps ``on_preview(step, latents)``. Steps count from 1 over every call of the batch, so an SDXL
    refiner's steps go on from the base's. Empty when neither is asked for."""
    if not every and user is None:
        return {}
    done = [0]

    def callback(pipe, step, timestep, kwargs):
        if user is not None:
            kwargs = user(pipe, step, timestep, kwargs) or kwargs
        done[0] += 1
        if every and done[0] % every == 0:
            on_preview(done[0], kwargs["latents"])
        return kwargs

    return {"callback_on_step_end": callback}


def make_jobs(g, resolution: int, offered: dict[str, tuple], default_sampler: Default | None = None) -> list[Job]:
    """The images ``generate.*`` asks for, in order: each prompt ``images_per_prompt`` times.

    ``offered``: the family's samplers by name (``schedulers``). ``default_sampler``: the sampler of an image whose
    line names none (``--ss``) when ``generate.scheduler`` is unset (``samplers.default``: the base's own); None
    before the base is loaded, when such jobs carry no sampler yet (the checks before anything loads).

    Seeds: a line's ``--d`` and the ones after it for its further images; otherwise ``generate.seed``
    counting up over every image without its own seed, so each image has a seed of its own.
    """
    lines = [(p, {}, f"generate.prompts[{i}]") for i, p in enumerate(g.prompts)]
    if g.prompt_file:
        path = Path(g.prompt_file).expanduser()
        if not path.is_file():
            raise ConfigError(f"generate.prompt_file={g.prompt_file}: no such file")
        lines += read_prompt_file(path)
    if not lines:
        raise ConfigError('generate: no prompt; pass generate.prompts=["a photo of sks dog"] or generate.prompt_file')
    size = (g.width or resolution, g.height or resolution)
    if g.scheduler is not None:
        sampler, source, fewest = g.scheduler, "generate.scheduler", MIN_STEPS.get(g.scheduler, 1)
    elif default_sampler is not None:
        own = default_sampler
        sampler, source = own.name, "base" if own.from_base else "family"
        fewest = own.fewest_steps if own.from_base else MIN_STEPS.get(own.name, 1)
    else:
        sampler, source, fewest = "", "", 1
    default = Job("", g.negative_prompt, *size, 0, g.guidance_scale, g.steps, sampler, source)
    jobs, next_seed = [], g.seed
    for prompt, options, where in lines:
        try:
            first_seed = int(options["seed"]) if "seed" in options else None
            values = {
                "negative": options.get("negative", default.negative),
                "width": int(options.get("width", default.width)),
                "height": int(options.get("height", default.height)),
                "guidance": float(options.get("guidance", default.guidance)),
                "steps": int(options.get("steps", default.steps)),
                "scheduler": options.get("scheduler", default.scheduler),
            }
        except ValueError as e:
            raise ConfigError(f"{where}: {e}") from None
        if "scheduler" in options:
            values["scheduler_from"] = "--ss"
            if values["scheduler"] not in offered:
                raise ConfigError(f"{where}: scheduler {values['scheduler']!r}; choose one of {', '.join(offered)}")
        sides = (values["width"], values["height"])
        if not all(8 <= v <= MAX_SIDE and v % 8 == 0 for v in sides):
            raise ConfigError(
                f"{where}: width and height {sides[0]}x{sides[1]} (--w/--h, else generate.width/height): each a "
                f"multiple of 8 from 8 to {MAX_SIDE}"
            )
        if values["steps"] < 1 or (g.init_image and int(values["steps"] * g.strength) < 1):
            raise ConfigError(f"{where}: steps must be at least 1, and steps x generate.strength at least 1")
        least = MIN_STEPS.get(values["scheduler"], 1) if "scheduler" in options else fewest
        if values["steps"] < least:
            if values.get("scheduler_from", default.scheduler_from) != "base":
                raise ConfigError(f"{where}: the {values['scheduler']} sampler takes at least {least} steps")
            raise ConfigError(
                f"{where}: the base's own sampler ({values['scheduler']}) takes at least {least} steps; raise the "
                "steps or name another sampler (generate.scheduler, --ss)"
            )
        if not math.isfinite(values["guidance"]):
            name = (
                f"{where}: --l {options['guidance']}"
                if "guidance" in options
                else f"generate.guidance_scale={g.guidance_scale}"
            )
            raise ConfigError(f"{name}: a finite guidance scale, e.g. 7.5")
        if first_seed is not None:
            _check_seeds(first_seed, g.images_per_prompt, f"{where}: --d {first_seed}")
        else:
            _check_seeds(next_seed, g.images_per_prompt, f"generate.seed={g.seed} (counting up to {where})")
        for k in range(g.images_per_prompt):
            if first_seed is not None:
                seed = first_seed + k
            else:
                seed, next_seed = next_seed, next_seed + 1
            jobs.append(replace(default, prompt=prompt, seed=seed, **values))
    return jobs


def _check_seeds(first: int, count: int, name: str) -> None:
    """Each of a prompt's ``count`` images takes the next seed from ``first``: all must lie in 0..SEED_MAX.
    ``name``: what set ``first`` (a line's --d, or generate.seed), for the message."""
    if not 0 <= first <= SEED_MAX - count + 1:
        per_image = f"; its {count} images (generate.images_per_prompt) take seeds up to {first + count - 1}"
        raise ConfigError(f"{name}: a seed from 0 to {SEED_MAX - count + 1}{per_image if count > 1 else ''}")


def batches(jobs: list[Job], size: int) -> list[list[tuple[int, Job]]]:
    """Runs of consecutive jobs with the same settings, at most ``size`` each, with their indices."""
    out: list[list[tuple[int, Job]]] = []
    for i, job in enumerate(jobs):
        if out and len(out[-1]) < size and out[-1][-1][1].settings() == job.settings():
            out[-1].append((i, job))
        else:
            out.append([(i, job)])
    return out


def post_process(image: Image.Image, post, reference: Image.Image | None) -> Image.Image:
    """Optional steps after sampling, in this order: colour correction, upscale, sharpen.

    - colour correction: each RGB channel's mean and spread matched to ``reference`` (the init image);
    - upscale: Lanczos by an integer factor;
    - sharpen: an unsharp mask of that strength (1.0 = 100 %).
    """
    if post.color_correct and reference is not None:
        pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
        target = np.asarray(reference.convert("RGB").resize(image.size, Image.Resampling.LANCZOS), dtype=np.float32)
        mean, std = pixels.mean((0, 1)), pixels.std((0, 1)) + 1e-6
        pixels = (pixels - mean) / std * target.std((0, 1)) + target.mean((0, 1))
        image = Image.fromarray(pixels.clip(0, 255).round().astype(np.uint8))
    if post.upscale > 1:
        image = image.resize((image.width * post.upscale, image.height * post.upscale), Image.Resampling.LANCZOS)
    if post.sharpen > 0:
        image = image.filter(ImageFilter.UnsharpMask(radius=2, percent=round(post.sharpen * 100), threshold=0))
    return image


def load_init_image(path: str, width: int, height: int) -> Image.Image:
    """The image-to-image start, read without modifying the file, resized to the output size."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError(f"generate.init_image={path}: no such file")
    try:
        with Image.open(file) as image:
            return image.convert("RGB").resize((width, height), Image.Resampling.LANCZOS)
    except OSError as e:
        raise ConfigError(f"generate.init_image={path}: not an image PIL can read ({e})") from None


def to_pil(images: torch.Tensor) -> list[Image.Image]:

    return [Image.fromarray(a.numpy()) for a in to_uint8(images)]
