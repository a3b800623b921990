"""The configuration schema: every key a run understands, as a typed dataclass field (closed vocabularies
as the Enums of tuner/choices.py). This module holds what a run trains on and how; what it puts out
(samples, logs, validation, evaluation, export, generate) is in tuner/output_config.py, the data section in
tuner/data_config.py.

The schema is registered in Hydra's ConfigStore under the YAML in ``conf/`` and ``recipes/``
(tuner/compose.py), so a mistyped key, a wrong type or a value outside its vocabulary fails at compose
time, naming the key, before any model is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from omegaconf import MISSING

from tuner.choices import (
    AdapterInit,
    AdapterType,
    Builtin,
    Dtype,
    Loss,
    LrScheduler,
    MixedPrecision,
    NonFinite,
    Optimizer,
    PredictionType,
    Quantize,
    SelectMode,
    Strategy,
    SubjectTransform,
    Targets,
    TextEncoderTrain,
    TimestepBias,
    WeightingScheme,
)
from tuner.data_config import DataConfig
from tuner.output_config import (
    EvalConfig,
    ExportConfig,
    ExtractConfig,
    GenerateConfig,
    LogConfig,
    MergeConfig,
    ResizeConfig,
    SampleConfig,
    ValidationConfig,
)

# conf/ and recipes/ at the top of a source checkout, or inside the package when installed from a wheel


@dataclass
class ModelConfig:
    # a registered model family (tuner.models.FAMILIES); conf/model/NAME.yaml sets it with its defaults
    family: str = ""
    # a local diffusers pipeline folder, or a single-file .safetensors checkpoint (with config)
    path: str | None = None
    # for a single-file path: a local diffusers folder of the same family whose configs and tokenizers
    # describe it (its weights are not read); the file is converted once, under $TUNER_HOME/single_file/
    config: str | None = None
    # an embedded base tuner builds and caches itself when path is null: digits (or null for none)
    builtin: Builtin | None = None
    # pixel resolution the model was trained at; the data stage resizes to it
    resolution: int = 512
    # epsilon | v_prediction; null reads it from the scheduler config
    prediction_type: PredictionType | None = None
    # also load pickled .bin weights where a folder has no .safetensors (read with torch's weights_only=True)
    allow_pickle: bool = False
    # QLoRA: the frozen denoiser's (quantize) and text encoders' (quantize_text_encoders) linear layers held as
    # bitsandbytes' nf4 or int8 while adapters train on top in full precision; exports use the base's own
    # weights. null: as loaded
    quantize: Quantize | None = None
    quantize_text_encoders: Quantize | None = None
    # the text encoders and the VAE leave the device once their outputs are cached (they come back to sample).
    # null: on where the device is an accelerator (on a CPU there is nowhere else to put them)
    offload_frozen: bool | None = None
    # sd2 (v-prediction): rescale the schedule to zero terminal SNR, sample with trailing timesteps
    zero_terminal_snr: bool = False
    # flux, sd3: shift of the training sigmas (null: the scheduler's); the guidance Flux-dev is trained
    # with (its guidance embedding); the T5 prompt length (null: the pipeline's default, 512 / 256)
    timestep_shift: float | None = None
    guidance: float = 1.0
    max_sequence_length: int | None = None
    # flux, sd3: how training timesteps are drawn and losses weighed (diffusers' SD3 schemes):
    # none (uniform) | logit_normal | mode | sigma_sqrt | cosmap
    weighting_scheme: WeightingScheme = WeightingScheme.none
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    # sd3: skip-layer guidance at sampling (StableDiffusion3Pipeline's skip_guidance_layers), the joint blocks an extra
    # pass skips over the first steps; Stability advises [7, 8, 9] for SD3.5 Medium. null: none
    skip_guidance_layers: list[int] | None = None
    # flux_kontext: each reference resized to the nearest of Kontext's preferred ~1 MP sizes, as its pipeline does
    # by default; false: kept at its own size (rounded down to the latents' multiple)
    control_auto_resize: bool = True


@dataclass
class BaseConfig:
    """How the embedded `digits` base is trained (recipe digits_base). Changing any of it rebuilds."""

    size: str = "digits"
    seed: int = 0
    vae_steps: int = 250
    vae_batch_size: int = 32
    vae_lr: float = 4e-3
    unet_steps: int = 400
    unet_batch_size: int = 64
    unet_lr: float = 4e-3
    # the cross-attention's key and value projections (where the caption enters) learn this many times faster
    cross_attention_lr: float = 4.0
    # min-SNR-gamma loss weighting of the U-Net's training; null: off
    snr_gamma: float | None = 5.0
    # later: the noisiest quarter of the timesteps, where the digit is decided, drawn twice as often; none: uniform
    timestep_bias: TimestepBias = TimestepBias.later
    ema_decay: float = 0.995
    caption_dropout: float = 0.1


@dataclass
class SubjectConfig:
    """The quickstart's synthetic subject: a few real digits, transformed so the base cannot draw them."""

    digit: int = 7
    # mirror | flip | rot90 | rot180 | rot270 | transpose
    transform: SubjectTransform = SubjectTransform.mirror
    count: int = 5
    seed: int = 0
    # written as PNG files of this size; the prepare stage resizes them to the model's resolution
    image_size: int = 64


@dataclass
class PriorConfig:
    """DreamBooth prior preservation: class images (data.class_prompt) trained beside the instance images."""

    enabled: bool = False
    # class images generated from the base when data.class_dir (or the run's cache) holds fewer than this
    num_class_images: int = 100
    # each batch holds train.batch_size class samples; their loss is weighted by this
    loss_weight: float = 1.0
    # seeds of generated class images start here
    seed: int = 0
    # images per pipeline call while generating class images
    sample_batch_size: int = 16


@dataclass
class BlockGroup:
    # a glob over U-Net parameter names, e.g. up_blocks.*.attentions.*; the first matching group wins
    pattern: str = MISSING
    # null: train.learning_rate
    lr: float | None = None


@dataclass
class AdapterConfig:
    """What trains in the denoiser: a peft adapter (lora, loha, lokr), chosen blocks, all of it, or nothing."""

    # lora | loha | lokr | partial_unet | full | none
    type: AdapterType = AdapterType.lora
    rank: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    # attn | attn_ff | all_linear | locon (all linear layers plus the resnets' convolutions)
    targets: Targets = Targets.attn_ff
    # explicit module names or suffixes; when set, they replace the preset
    target_modules: list[str] = field(default_factory=list)
    # lora: gaussian | default (peft's kaiming A, zero B); inits that rewrite the base (pissa, olora) are refused
    init: AdapterInit = AdapterInit.gaussian
    use_dora: bool = False
    # scale by alpha / sqrt(rank) instead of alpha / rank
    use_rslora: bool = False
    # partial_unet: the U-Net parameters to unfreeze, by name glob, each group with its learning rate
    blocks: list[BlockGroup] = field(default_factory=list)


@dataclass
class TextEncoderConfig:
    """Training the text encoder beside the denoiser."""

    # none | lora | full
    train: TextEncoderTrain = TextEncoderTrain.none
    # null: train.learning_rate
    learning_rate: float | None = None
    # the text encoder freezes after this fraction of train.max_steps (1.0: trains to the end)
    stop_at: float = 1.0
    # lora on these modules, with adapter.rank / alpha / dropout
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "out_proj"])


@dataclass
class EmbeddingConfig:
    """Textual inversion (alone, adapter=none) or pivotal tuning (with an adapter): new token embeddings."""

    # new tokens written into prompts, e.g. ["<sks>"]; empty: off
    tokens: list[str] = field(default_factory=list)
    # a word per token whose embedding starts it (e.g. [dog]); empty: the mean of the vocabulary
    init_words: list[str] = field(default_factory=list)
    # vectors per token (diffusers' convention: <sks> <sks>_1 ... in the prompt)
    vectors: int = 1
    # null: train.learning_rate
    learning_rate: float | None = None


@dataclass
class EarlyStopConfig:
    """Stop training before train.max_steps, judged at validation steps (validation.every)."""

    # stop when checkpoints.select's metric has not improved by more than min_delta for this many validations
    # (0: never)
    patience: int = 0
    min_delta: float = 0.0
    # stop when drift (class-prompt samples moving toward the subject) passes this bound; the weights of the last
    # validation within it are the run's. null: never
    max_drift: float | None = None


@dataclass
class TrainConfig:
    max_steps: int = 400
    batch_size: int = 4
    learning_rate: float = 1e-3
    # constant | constant_with_warmup | linear | cosine | one_cycle
    lr_scheduler: LrScheduler = LrScheduler.constant
    warmup_steps: int = 0
    weight_decay: float = 1e-2
    max_grad_norm: float = 1.0
    # adamw (fused where the device has it) | adamw8bit (bitsandbytes) | prodigy (set learning_rate=1) | sgd
    optimizer: Optimizer = Optimizer.adamw
    # optimizer steps take this many micro-batches of batch_size each
    gradient_accumulation_steps: int = 1
    # multiply learning_rate by batch_size * gradient_accumulation_steps * number of processes
    scale_lr: bool = False
    # l2 | l1 | huber (huber_delta sets where it turns from quadratic to linear)
    loss: Loss = Loss.l2
    huber_delta: float = 0.1
    # min-SNR-gamma loss weighting, e.g. 5.0; null: off
    snr_gamma: float | None = None
    # e.g. 0.05: lets the model learn overall brightness shifts; 0: off
    noise_offset: float = 0.0
    # e.g. 0.1: the U-Net sees slightly other noise than the target (Ning et al. 2023); 0: off
    input_perturbation: float = 0.0
    # timesteps are drawn from [min_timestep, max_timestep); null: the scheduler's last
    min_timestep: int = 0
    max_timestep: int | None = None
    # none | earlier | later: draw timestep_bias_portion of the range at the chosen end
    # timestep_bias_multiplier times as often
    timestep_bias: TimestepBias = TimestepBias.none
    timestep_bias_multiplier: float = 2.0
    timestep_bias_portion: float = 0.25
    # EMA of the trained weights (e.g. 0.999), used for the gallery, evaluation and export; null: off
    ema_decay: float | None = None
    # no | fp16 | bf16, through accelerate: the frozen base runs in it, trained weights stay fp32
    mixed_precision: MixedPrecision = MixedPrecision.no
    # the VAE's dtype: float32 unless asked (fp16 VAEs produce NaNs)
    vae_dtype: Dtype = Dtype.float32
    # recompute activations in the backward pass: less memory, about a third more time
    gradient_checkpointing: bool = False
    # the frozen weights of this many of the denoiser's blocks (those holding the most) live in host memory and
    # are copied to the device just before each block runs; same gradients, less device memory, slower steps
    offload_blocks: int = 0
    # each trained tensor takes its optimizer step as its gradient arrives in the backward pass, which frees the
    # gradient then: a full or partial fine-tune never holds all its gradients (needs max_grad_norm=0, one process)
    fused_backward: bool = False
    log_every: int = 50
    # a step whose loss is NaN or infinite: stop (the last checkpoint stays as it was) or skip it
    nonfinite: NonFinite = NonFinite.stop
    # time each phase of the steps (summary.json's step_phases); on a GPU it waits for the device at each
    # phase's end, so it slows training: for benchmarks (on a CPU phases are always timed, at no cost)
    profile: bool = False
    # the denoiser in channels-last layout (on a CPU: PyTorch's own convolution kernels). null: on for float32
    # LoRA training on a CPU when no convolution weight trains and not DoRA (faster here, tools/bench.py)
    channels_last: bool | None = None
    early_stop: EarlyStopConfig = field(default_factory=EarlyStopConfig)


@dataclass
class CheckpointsConfig:
    """Training checkpoints in RUN/checkpoints/step-N/ (trained tensors, optimizer, scheduler, EMA, RNG, data order)."""

    # save every N optimizer steps and at the end; 0: only when stopped by SIGTERM / SIGINT
    every: int = 0
    # how many to keep (the newest)
    keep: int = 2
    # a metric of the validation steps (val_loss, val_loss_class, fidelity, preservation, drift, score, clip_i,
    # clip_t, dino, diversity): a checkpoint is saved at every validation step and the best ones kept besides the
    # newest; export.from=best exports the best. null: none
    select: str | None = None
    # min | max; null: the metric's own direction (losses and drift: min, the rest: max)
    select_mode: SelectMode | None = None
    # how many of the best checkpoints to keep besides the newest (checkpoints.keep)
    best: int = 1


@dataclass
class CacheConfig:
    """The frozen outputs (latents, caption embeddings) every run and rank shares (tuner/training/cache.py)."""

    # where: null: $TUNER_HOME/cache (a filesystem all machines mount, for several)
    dir: str | None = None
    # remove the least recently used entries beyond this many GB (null: keep all)
    max_gb: float | None = None


@dataclass
class DistributedConfig:
    """Several processes (torchrun, accelerate launch): how the trained modules are spread over them."""

    # ddp: every rank holds the whole model and optimizer state, gradients averaged (any adapter, fastest);
    # fsdp: FSDP2 shards the trained modules' weights, gradients and optimizer state over the ranks (full and
    # partial fine-tunes whose optimizer state does not fit one device); checkpoints are then saved sharded
    strategy: Strategy = Strategy.ddp
    # fsdp: free each block's gathered weights after its forward (gathered again for the backward); false keeps
    # them until the backward (more memory, less communication)
    reshard_after_forward: bool = True


@dataclass
class TunerConfig:
    # the name of the recipe; set by recipe=NAME
    recipe: str = MISSING
    # the stages this recipe runs, in order
    stages: list[str] = field(default_factory=list)
    # where the run writes everything; null: a new folder under ./runs
    output_dir: str | None = None
    # where the embedded base is cached; null: $TUNER_HOME, else ~/.cache/tuner
    home: str | None = None
    seed: int = 0
    # an exported adapter (folder or .safetensors file) for recipes that use one instead of training
    checkpoint: str | None = None
    # continue a training run: auto (the newest checkpoint in output_dir, if any) or a checkpoint folder
    resume: str | None = None
    # write into an output_dir that holds an earlier run (its files may be replaced)
    overwrite: bool = False
    checkpoints: CheckpointsConfig = field(default_factory=CheckpointsConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    base: BaseConfig = field(default_factory=BaseConfig)
    subject: SubjectConfig = field(default_factory=SubjectConfig)
    data: DataConfig = field(default_factory=DataConfig)
    prior: PriorConfig = field(default_factory=PriorConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    embedding: EmbeddingConfig = field(default_factory=EmbeddingConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    merge: MergeConfig = field(default_factory=MergeConfig)
    extract: ExtractConfig = field(default_factory=ExtractConfig)
    resize: ResizeConfig = field(default_factory=ResizeConfig)


DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


# the largest seed torch.Generator.manual_seed takes
SEED_MAX = 2**63 - 1
