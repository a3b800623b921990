"""The schema of what a run puts out: samples for people (gallery), logs, validation during training, the
digits evaluation, export formats, and generate's images. Part of the configuration schema (tuner/config.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from omegaconf import MISSING

from tuner.choices import Dtype, ExportFormat, ExportFrom, Targets, Variant


@dataclass
class SampleConfig:
    """Gallery sampling: fixed seeds so base and fine-tuned images are comparable."""

    # images per pipeline call (gallery, class images, evaluation); lower it if memory runs out
    batch_size: int = 16
    # gallery prompts; empty: the instance and class prompts
    prompts: list[str] = field(default_factory=list)

    seeds: list[int] = field(default_factory=lambda: list(range(8)))
    steps: int = 25
    guidance_scale: float = 3.0
    # images are upscaled (nearest) to at least this many pixels in the gallery
    display_size: int = 64
    # sdxl: a local SDXL refiner folder; gallery images are the base's first refiner_start of the steps, then the
    # refiner's (as generate.refiner), for the base and the fine-tuned model alike
    refiner: str | None = None
    refiner_start: float = 0.8


@dataclass
class LogConfig:
    """Training logs: TensorBoard in RUN/logs (``tensorboard --logdir runs``), Weights & Biases optionally."""

    tensorboard: bool = True
    # needs the wandb package (pip install wandb); WANDB_MODE=offline keeps the run on this machine
    wandb: bool = False
    wandb_project: str = "tuner"


@dataclass
class ValidationConfig:
    """Samples every ``every`` steps (0: never) at fixed prompts and seeds, into RUN/validation/: a grid PNG per
    step and an index.html with one row per step, growing while the run trains."""

    every: int = 0
    # default: sample.prompts, else the instance (and class) prompt, else the first two training captions
    prompts: list[str] = field(default_factory=list)
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3])
    # default: sample.steps
    steps: int | None = None
    # default: sample.guidance_scale
    guidance_scale: float | None = None
    # the metrics of each validation step (tuner/scoring.py) score this many samples of the instance prompt and
    # of the class prompt (seeds eval.seed, eval.seed + 1, ...)
    samples: int = 8
    # the held-out loss (data.val_split, data.val_dir) of each image at this many fixed timesteps, fixed noise
    loss_timesteps: int = 8
    # edit families: the pairs each validation step edits (the held-out ones first, then the first training ones),
    # drawn as controls | base | fine-tuned | target
    pairs: int = 4


@dataclass
class EvalConfig:
    """Metrics of a fine-tune (tuner/scoring.py), at validation steps and in the evaluate stage: the digits
    classifier on the embedded base; on any base, the local feature models given here (nothing is downloaded)."""

    # a local CLIP model folder (transformers' CLIPModel): clip_i (samples vs instance images), clip_t (samples vs
    # their prompt), drift and diversity when no DINO is given
    clip: str | None = None
    # a local DINO / DINOv2 folder (transformers' AutoModel): dino (subject fidelity), drift, diversity
    dino: str | None = None
    # samples per prompt in the evaluate stage
    samples: int = 64
    seed: int = 1000
    steps: int = 25
    guidance_scale: float = 3.0


@dataclass
class ExportConfig:
    """What the export stage writes (see tuner/export/formats.py); each lands in a run subfolder of its name."""

    # any of diffusers, kohya, peft, merged, single_file. null: the family's own (sd15, sd2, sdxl, flux: diffusers
    # and kohya; sd3: diffusers), plus the format that holds the rest of what trains (merged for a fine-tune)
    formats: list[ExportFormat] | None = None
    # file name of the kohya and single-file exports (and the model card's title); null: the run folder's name
    name: str | None = None
    # tensors of the adapter files (diffusers, kohya, peft): float32 | float16 | bfloat16
    dtype: Dtype = Dtype.float32
    # merged: a reduced-precision variant saved beside the fp32 weights (fp16 | bf16 | null for none)
    variant: Variant | None = Variant.fp16
    # single_file: float32 | float16 | bfloat16 (A1111 and ComfyUI load any)
    single_file_dtype: Dtype = Dtype.float32
    # write the base model's absolute path into metadata and the model card (default: its folder name only)
    include_paths: bool = False
    # last | best: the weights of the last step, or of the best checkpoint by checkpoints.select (written
    # export.from on the command line; export.from_ in YAML, as "from" is a Python keyword)
    from_: ExportFrom = ExportFrom.last


@dataclass
class AdapterRef:
    """An adapter to generate with: a run folder, an export folder or a LoRA / embedding file, and its weight."""

    path: str = MISSING
    weight: float = 1.0


@dataclass
class MergeConfig:
    """recipe=lora_merge: LoRAs added into one (tuner/stages/toolbox.py)."""

    # [{path: A, weight: 1.0}, {path: B, weight: 0.5}]: run folders, export folders, LoRA files or peft folders
    inputs: list[AdapterRef] = field(default_factory=list)
    # null: exact, the inputs' ranks stacked (each module's rank is the sum of theirs); R: each module cut to rank
    # R by its singular values (needed for LoHa / LoKr inputs, which do not stack)
    rank: int | None = None
    # fuse the merged LoRA into the base and write the model (export.formats null: merged) instead of a LoRA
    into_base: bool = False


@dataclass
class ExtractConfig:
    """recipe=lora_extract: a LoRA approximating a fine-tuned model minus its base (model.path)."""

    # the fine-tuned model: a diffusers folder or a single-file checkpoint of model.path's family
    tuned: str | None = None
    # each module's rank; with energy, the most a module gets
    rank: int = 32
    # convolutions' rank (null: rank)
    conv_rank: int | None = None
    # the fewest singular values per module keeping this share of its difference's squared norm, e.g. 0.9
    energy: float | None = None
    # modules whose difference is below this share of their weight's norm are skipped (and listed)
    threshold: float = 1e-3
    # where LoRA modules may go in the denoiser: attn | attn_ff | all_linear | locon (+ the resnets' convolutions)
    targets: Targets = Targets.locon
    # also the text encoders' linear layers, where they differ
    text_encoders: bool = True


@dataclass
class ResizeConfig:
    """recipe=lora_resize: a LoRA (checkpoint=) cut to a lower rank by its singular values."""

    # each module's new rank (never more than it had); with energy, the most a module gets (null: its own)
    rank: int | None = None
    # the fewest singular values per module keeping this share of its squared norm, e.g. 0.95
    energy: float | None = None


@dataclass
class PostConfig:
    """Optional post-processing of generated images, in this order."""

    # match each RGB channel's mean and spread to the init image (image-to-image only)
    color_correct: bool = False
    # integer upscale factor (Lanczos); 1: off
    upscale: int = 1
    # unsharp-mask strength (1.0 = 100 %); 0: off
    sharpen: float = 0.0


@dataclass
class GenerateConfig:
    """recipe=generate: a base plus adapters, prompts (with kohya-style per-line options), images + a page."""

    adapters: list[AdapterRef] = field(default_factory=list)
    prompts: list[str] = field(default_factory=list)
    # one prompt per line, then options: --n negative --w width --h height --d seed --l guidance --s steps --ss sampler
    prompt_file: str | None = None
    negative_prompt: str = ""
    # first seed; each image without a --d seed takes the next one
    seed: int = 0
    images_per_prompt: int = 1
    steps: int = 25
    guidance_scale: float = 7.5
    # null: data.resolution
    width: int | None = None
    height: int | None = None
    # null: the scheduler saved in the base's folder (what its pipeline draws with) where the family's pipeline drives
    # it, else the family's default. Named: the DDPM-type families' ddim | ddpm | euler | euler_a | heun | dpm++ |
    # dpm++_karras | unipc | pndm, the flow-matching ones' flow_euler | flow_dpm++ | flow_unipc | flow_heun, less
    # what a family's pipeline cannot drive (tuner/models/samplers.py)
    scheduler: str | None = None
    batch_size: int = 4
    # edit families: the reference images each prompt edits (the family's pipeline prepares them)
    controls: list[str] = field(default_factory=list)
    # image-to-image: start from this image, keeping (1 - strength) of it
    init_image: str | None = None
    strength: float = 0.75
    post: PostConfig = field(default_factory=PostConfig)
    # sdxl: a local SDXL refiner folder; the base draws the first refiner_start of the steps, the refiner the rest
    refiner: str | None = None
    refiner_start: float = 0.8
    # every N denoising steps, each image's decoded preview in images/previews/<image>/step-NNN.png; 0: none
    preview_every: int = 0
    # a function of yours that diffusers calls after every step: fn(pipe, step, timestep, callback_kwargs) ->
    # callback_kwargs (``callback_on_step_end``). path/to/file.py:fn, or package.module.fn of an installed package
    # (never a module in the current folder); from the command line only, not a recipe (tuner/user_code.py)
    callback: str | None = None
