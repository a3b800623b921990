"""What every model family provides, and the parts most of them share.

A family is a ``Family`` subclass in its own module (sd15.py, flux.py, ...): the names of its diffusers classes,
how it encodes prompts, how its denoiser is called, and its training objective. The training loop, the trainables
and the exports only ever talk to this interface, so adding a family is one module and one ``conf/model/`` file.

The components are loaded from a local diffusers folder, each with the class its ``model_index.json`` names,
weights from safetensors only (``allow_pickle``: ``.bin`` where there is no ``.safetensors``, which diffusers and
transformers read with ``torch.load(weights_only=True)``). A single file becomes such a folder once.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tuner.config import BlockGroup, ModelConfig
from tuner.errors import ConfigError
from tuner.models import samplers
from tuner.models.objectives import NoiseObjective
from tuner.models.references import References

Cond = torch.Tensor | dict[str, torch.Tensor]  # prompt conditioning: one tensor, or named tensors


@dataclass
class Components:
    """A loaded pipeline's modules, by their diffusers component names."""

    denoiser: torch.nn.Module  # the U-Net or the transformer
    vae: torch.nn.Module
    text_encoders: dict[str, torch.nn.Module]  # text_encoder, text_encoder_2, ...
    tokenizers: dict[str, object]  # tokenizer, tokenizer_2, ... (in the text encoders' order)
    noise_scheduler: object  # the training scheduler
    prediction_type: str  # epsilon | v_prediction | flow
    denoiser_name: str = "unet"  # unet | transformer: its name in the pipeline and in LoRA files
    extra: dict = field(default_factory=dict)  # family settings (e.g. Flux's guidance for training)

    @property
    def unet(self) -> torch.nn.Module:
        return self.denoiser

    @property
    def text_encoder(self) -> torch.nn.Module:
        return self.text_encoders["text_encoder"]

    @property
    def tokenizer(self):
        return self.tokenizers["tokenizer"]

    def tokenizer_of(self, encoder: str):
        """The tokenizer of text encoder ``encoder`` (``text_encoder_2``'s is ``tokenizer_2``)."""
        return list(self.tokenizers.values())[list(self.text_encoders).index(encoder)]

    def trainable(self) -> dict[str, torch.nn.Module]:
        """The modules an adapter can go into: the denoiser, then the text encoders."""
        return {self.denoiser_name: self.denoiser, **self.text_encoders}

    def modules(self) -> dict[str, torch.nn.Module]:
        return {**self.trainable(), "vae": self.vae}


def tree_map(fn, x):
    """``fn`` on a tensor, on each tensor of a dict of tensors, or None for None."""
    if x is None:
        return None
    if isinstance(x, dict):
        return {k: fn(v) for k, v in x.items()}
    return fn(x)


def tree_cat(parts: list):
    if parts[0] is None:
        return None
    if isinstance(parts[0], dict):
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    return torch.cat(parts)


def _class(library: str, name: str):
    return getattr(importlib.import_module(library), name)


def _entry(value) -> bool:
    """A model_index.json component entry ([library, class], or [null, null] for one left out), not a setting."""
    return isinstance(value, list) and len(value) == 2 and all(v is None or isinstance(v, str) for v in value)


class Family:
    """The interface, with what the UNet-and-CLIP families share. Subclasses set the class attributes."""

    NAME = ""
    PIPELINE = "StableDiffusionPipeline"  # the diffusers pipeline class: loading, sampling and LoRA files
    IMG2IMG: str | None = "StableDiffusionImg2ImgPipeline"
    # a refiner after this family's base (generate.refiner, sample.refiner): its pipeline class, the class each of
    # its components must have ({name: classes}); its ``refiner_pipeline`` builds it. None: no refiner
    REFINER_PIPELINE: str | None = None
    REFINER_COMPONENTS: dict[str, tuple[str, ...] | None] = {}
    DENOISER = "unet"
    DENOISER_CLASS = "UNet2DConditionModel"  # its diffusers class (the model card's single-file usage)
    TEXT_ENCODERS = ("text_encoder",)  # in the order of their tokenizers (tokenizer, tokenizer_2, ...)
    TOKENIZERS: tuple[str, ...] = ()  # its folder's tokenizer entries, where not tokenizer, tokenizer_2, ...
    NEGATIVE_PROMPT_REFUSAL = ""  # why its pipeline takes no negative prompt (generate.negative_prompt), if none
    LORA_TEXT_ENCODERS = ("text_encoder",)  # those text_encoder.train=lora puts adapters into
    # the text encoders new tokens (embedding.tokens) go into, each with the key its vectors have in A1111's and
    # ComfyUI's embedding file of a two-encoder family (a one-encoder family's files: {token: vectors} for
    # diffusers, {"emb_params": vectors} for A1111/ComfyUI); empty: no textual inversion (EMBEDDING_REFUSAL says why)
    EMBEDDINGS: dict[str, str] = {"text_encoder": "clip_l"}
    EMBEDDING_REFUSAL = ""
    TRAINING_SCHEDULER = "DDPMScheduler"
    FLOW = False  # trained by flow matching (its samplers: tuner.models.samplers.FLOW_SCHEDULERS)
    ZERO_TERMINAL_SNR = False  # takes model.zero_terminal_snr (a v-prediction family)
    # the sampler when none is named and the base folder's own scheduler is not one the pipeline draws with
    DEFAULT_SCHEDULER = "ddim"
    NO_SCHEDULERS: tuple[str, ...] = ()  # samplers of its kind that its diffusers pipeline cannot drive
    # the denoiser's blocks (for the locon / all_linear presets) and its LoRA target presets
    BLOCKS = ("down_blocks.", "mid_block.", "up_blocks.")
    # adapter=partial_unet without adapter.blocks: these parameter-name globs train, at train.learning_rate
    PARTIAL_BLOCKS: tuple[str, ...] = ("up_blocks.*.attentions.*",)
    OFFLOAD_BLOCKS = ("ResnetBlock2D", "BasicTransformerBlock")  # the classes train.offload_blocks counts
    TARGETS = {
        "attn": ["to_q", "to_k", "to_v", "to_out.0"],
        "attn_ff": ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"],
    }
    TARGETS_EXCLUDE: str | None = None  # a regex of full module names the presets' names must not reach
    EXPORTS = ("diffusers", "peft", "merged")  # export formats this family can write
    DEFAULT_EXPORTS = ("diffusers",)  # what export.formats=null writes (plus what holds a fine-tune)
    # how exports name the family: kohya's key prefixes, ss_base_model_version, modelspec.architecture
    KOHYA_PREFIXES: dict[str, str] = {}
    KOHYA_V2 = False  # ss_v2: A1111 and Forge list a LoRA as SD2's by it
    DIFFUSERS_READS_KOHYA = True  # diffusers' load_lora_weights reads this family's kohya LoRA files
    KOHYA_READERS = "A1111 / Forge / ComfyUI / InvokeAI"  # the programs that read its kohya LoRA (the model card)
    # what the clients reading its files call it (tests/test_clients.py checks it there): ComfyUI's model class,
    # CLIP keys, tokenizer class, keys its single-file loader may miss (a regex), penultimate states; InvokeAI's base
    CLIENTS: dict[str, dict] = {}
    # parts a format cannot hold for this family, beyond what the format itself cannot (tuner/export/formats.py)
    FORMAT_LIMITS: dict[str, set[str]] = {}
    BASE_VERSION = ""
    MODELSPEC_ARCHITECTURE = ""
    SINGLE_FILE_TEXT = True  # the single file holds the text encoders (Flux's, as BFL ships it, does not)
    TINY_SINGLE_FILE = True  # diffusers converts its single file at any width (tests/test_conformance.py)
    DEFAULT_RESOLUTION = 512  # conf/model/NAME.yaml's model.resolution (tests/test_kit.py holds them equal)
    RESOLUTION_MULTIPLE = 8  # pixel sizes the VAE and the denoiser's patches divide
    # how recipe=inspect and the toolbox tell this family's adapter files from others' (tuner/export/inspection.py):
    # the widths of its denoiser's cross-attention input or transformer, a regex of module names only it has
    # ("." and "_" alike), and one of names it never has
    WIDTHS: frozenset[int] = frozenset()
    SIGNS: str | None = None
    NEVER: str | None = None
    # adapter files at the real model's widths, one per key style its clients write ({module: (rank, width)} of the
    # down factors): recipe=inspect must name this family, and only it, from each (tests/test_toolbox.py)
    SAMPLE_FILES: tuple[dict[str, tuple[int, int]], ...] = ()
    # what its tiny pipeline (build_tiny) needs on the command line, beyond model=NAME and data.resolution=32
    TINY_OPTIONS: tuple[str, ...] = ()
    REFERENCES: References | None = None  # an edit family's reference images (tuner/models/references.py)
    QUANTIZE_KEEP: tuple[str, ...] = ()  # denoiser submodules model.quantize leaves whole (code reads their dtype)

    def __init__(self, model: ModelConfig | None = None):
        """``model``: the ``model`` section (zero_terminal_snr, timestep_shift, guidance, max_sequence_length,
        weighting_scheme, ...); the schema's defaults when None."""
        self.model = model if model is not None else ModelConfig()

    # --- tiny and real-width models: tests, tools, benches ---------------------------------------
    def build_tiny(self, seed: int = 0, size: str = "test") -> dict:
        """A tiny pipeline's components of this family's real classes (deterministic for a seed), for
        ``tuner.models.tiny.make_tiny_pipeline``; ``size`` names a variant where the family has several."""
        raise NotImplementedError(f"{type(self).__name__} builds no tiny pipeline")

    REAL_SIZES: tuple[str, ...] = ()  # the family's other published sizes ``real_widths(size)`` builds

    def real_widths(self, size: str | None = None):
        """The family's denoiser and frozen encoders at the real model's widths (the memory plan, the toolbox
        bench): a ``tuner.models.real.RealWidths``; ``size``: one of ``REAL_SIZES`` (None: the default size)."""
        raise NotImplementedError(f"{type(self).__name__} has no real-width builder")

    # --- loading -------------------------------------------------------------------------------
    def check_folder(self, path: str | Path, allow_pickle: bool = False) -> Path:
        """Check that ``path`` is a local diffusers folder of this family, before anything loads.

        Raises:
            ConfigError: the folder is missing, is not a diffusers pipeline, is of another family, or
                holds a component only as pickled ``.bin`` weights (unless ``allow_pickle``).
        """
        folder = Path(path).expanduser()
        if folder.is_file():
            raise ConfigError(
                f"model.path={path} is a file: a single-file checkpoint is converted to a diffusers folder "
                "first (model.path=FILE works in a run, with model.config=FOLDER)"
            )
        if not folder.is_dir():
            raise ConfigError(f"model.path={path}: no such folder. Point it at a local diffusers pipeline folder.")
        index = folder / "model_index.json"
        if not index.is_file():
            raise ConfigError(
                f"model.path={path}: no model_index.json, so this is not a diffusers pipeline folder "
                "(a single .safetensors checkpoint goes in model.path directly, with model.config)"
            )
        name = json.loads(index.read_text()).get("_class_name")
        if name != self.PIPELINE:
            from tuner.models import family_of_pipeline

            other = family_of_pipeline(name)
            raise ConfigError(
                f"model.path={path} holds a {name}, not a {self.PIPELINE} (model={self.NAME}); "
                + (f"use model={other}" if other else "choose the matching model=... family")
            )
        for component in (self.DENOISER, "vae", *self.TEXT_ENCODERS):
            files = list((folder / component).glob("*.safetensors"))
            if not files and not allow_pickle:
                raise ConfigError(
                    f"model.path={path}: {component}/ has no .safetensors weights. tuner never unpickles a file you "
                    "did not allow: convert it to safetensors, or pass model.allow_pickle=true (read with "
                    "weights_only=True)"
                )
        return folder

    def check_config_folder(self, path: str | Path) -> Path:
        """A folder that describes a single-file checkpoint: this family's model_index.json and configs."""
        folder = Path(path).expanduser()
        index = folder / "model_index.json"
        if not index.is_file():
            raise ConfigError(f"model.config={path}: no model_index.json; give a local diffusers folder of this family")
        name = json.loads(index.read_text()).get("_class_name")
        if name != self.PIPELINE:
            raise ConfigError(f"model.config={path} describes a {name}, not a {self.PIPELINE} (model={self.NAME})")
        return folder

    def load(self, path: str | Path, prediction_type: str | None = None, allow_pickle: bool = False) -> Components:
        """The components of a local diffusers folder, frozen, in eval mode, offline."""
        folder = self.check_folder(path, allow_pickle)
        index = json.loads((folder / "model_index.json").read_text())
        kwargs = {"use_safetensors": None if allow_pickle else True}

        def component(name: str):
            library, cls = index[name]
            return _class(library, cls).from_pretrained(folder / name, **kwargs)

        denoiser = component(self.DENOISER)
        vae = component("vae")
        encoders = {name: component(name) for name in self.TEXT_ENCODERS}
        names = self.TOKENIZERS or ["tokenizer", *(f"tokenizer_{i}" for i in range(2, len(self.TEXT_ENCODERS) + 1))]
        tokenizers = {name: self.load_tokenizer(folder / name, *index[name]) for name in names}
        scheduler = _class("diffusers", self.TRAINING_SCHEDULER).from_pretrained(folder / "scheduler")
        for module in (denoiser, vae, *encoders.values()):
            module.requires_grad_(False).eval()
        c = Components(denoiser, vae, encoders, tokenizers, scheduler, "", self.DENOISER)
        # the pipeline's own settings (SDXL's force_zeros_for_empty_prompt, ...), for pipelines built in memory
        c.extra["pipeline_config"] = {k: v for k, v in index.items() if not k.startswith("_") and not _entry(v)}
        entry = index.get("scheduler")  # the class pipe(prompt) samples with (samplers.default)
        c.extra["scheduler_class"] = entry[1] if isinstance(entry, list) and len(entry) == 2 else None
        c.prediction_type = self.prediction(c, prediction_type)
        return c

    def load_tokenizer(self, folder: Path, library: str, cls: str):
        """The tokenizer (or processor) in ``folder``, of the class its model_index.json entry names."""
        return _class(library, cls).from_pretrained(folder)

    def prediction(self, c: Components, override: str | None) -> str:
        """epsilon | v_prediction: from the scheduler config unless overridden (model.prediction_type)."""
        prediction_type = override or c.noise_scheduler.config.prediction_type
        if prediction_type not in ("epsilon", "v_prediction"):
            raise ConfigError(f"model.prediction_type={prediction_type}: use epsilon or v_prediction")
        c.noise_scheduler.register_to_config(prediction_type=prediction_type)
        return prediction_type

    def pipeline_class(self):
        return _class("diffusers", self.PIPELINE)

    def check_trainable(self, folder: Path) -> None:
        """Refuse, with advice, a base folder this family should not be trained on (a step-distilled checkpoint);
        checked before anything loads, for runs that train."""

    def partial_blocks(self, adapter) -> list[BlockGroup]:
        """``adapter.blocks``, or (empty) this family's default globs (``PARTIAL_BLOCKS``) at the run's rate."""
        return list(adapter.blocks) or [BlockGroup(pattern=pattern, lr=None) for pattern in self.PARTIAL_BLOCKS]

    def denoiser_skeleton(self, folder: str | Path) -> torch.nn.Module:
        """The denoiser of a base folder built from its config on the meta device: its parameter names and
        shapes without reading (or allocating) a weight."""
        from accelerate import init_empty_weights

        folder = Path(folder).expanduser()
        library, cls = json.loads((folder / "model_index.json").read_text())[self.DENOISER]
        model_class = _class(library, cls)
        with init_empty_weights():
            return model_class.from_config(model_class.load_config(folder / self.DENOISER))

    def load_pipeline(self, path: str | Path):
        """The family's diffusers pipeline loaded from a folder, for serving and tests."""
        return self.pipeline_with(path)

    def pipeline_with(self, path: str | Path, **components):
        """The pipeline of the base folder ``path`` (its scheduler and extras) with the given modules in place."""
        return self.pipeline_class().from_pretrained(self.check_folder(path), use_safetensors=True, **components)

    def from_single_file(self, file: Path, config: Path, out: Path) -> Path:
        """Convert a single-file checkpoint to a diffusers folder ``out`` with diffusers' own loaders.

        ``config`` is a local diffusers folder of the same family, so nothing comes from a hub. A whole
        checkpoint (``SINGLE_FILE_TEXT``) takes only its configs and tokenizers; a family whose file is the
        denoiser alone, as its maker ships it, takes the text encoders and the VAE from it too (their weights).
        """
        if not self.SINGLE_FILE_TEXT:
            library, cls = json.loads((Path(config) / "model_index.json").read_text())[self.DENOISER]
            loader = getattr(_class(library, cls), "from_single_file", None)
            if loader is None:
                raise ConfigError(f"model={self.NAME}: diffusers cannot read a {cls} from a single file")
            denoiser = loader(str(file), config=str(config), subfolder=self.DENOISER, local_files_only=True)
            pipe = self.pipeline_with(config, **{self.DENOISER: denoiser})
        elif hasattr(self.pipeline_class(), "from_single_file"):
            pipe = self.pipeline_class().from_single_file(str(file), config=str(config), local_files_only=True)
        else:
            raise ConfigError(f"model={self.NAME}: diffusers cannot load this family from a single file")
        pipe.save_pretrained(out, safe_serialization=True)
        return out

    # --- prompts -------------------------------------------------------------------------------
    def tokenize(self, c: Components, prompts: list[str]) -> Cond:
        """Token ids padded to the tokenizer's length (see ``_ids``)."""
        return _ids(c.tokenizer, list(prompts), c.tokenizer.model_max_length)

    def encode_ids(self, text_encoders: dict, ids: Cond) -> Cond:
        """The denoiser's prompt conditioning from token ids (with gradients, for text encoder training)."""
        encoder = text_encoders["text_encoder"]
        return encoder(ids.to(next(encoder.parameters()).device))[0]

    @torch.no_grad()
    def encode_prompts(self, c: Components, prompts: list[str]) -> Cond:
        return self.encode_ids(c.text_encoders, self.tokenize(c, prompts))

    # --- latents -------------------------------------------------------------------------------
    def encode_images(self, vae, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The VAE's posterior mean and std (B, C, h, w) of images in [-1, 1] (B, 3, H, W)."""
        dist = vae.encode(images).latent_dist
        return dist.mean, dist.std

    def latent_normalization(self, vae) -> tuple:
        """(scale, shift) of a training latent, ``(sample - shift) * scale``: floats, or per-channel (C, 1, 1)
        tensors, from the VAE's config: its scaling and shift factors, or, for a VAE that has none (the Wan-style
        VAEs of Qwen-Image and the video models), its channels' ``latents_mean`` and ``latents_std``."""
        config = vae.config
        if config.get("scaling_factor") is None and config.get("latents_mean") and config.get("latents_std"):
            mean = torch.tensor(config.latents_mean, dtype=torch.float32).view(-1, 1, 1)
            std = torch.tensor(config.latents_std, dtype=torch.float32).view(-1, 1, 1)
            return 1.0 / std, mean
        return float(config.scaling_factor), float(config.get("shift_factor") or 0.0)

    def image_cond(self, dataset) -> dict[str, torch.Tensor] | None:
        """Per-image conditioning from the prepared dataset (SDXL's size and crop); None: none."""
        return None

    # --- training ------------------------------------------------------------------------------
    def predict(self, denoiser, noisy: torch.Tensor, timesteps: torch.Tensor, cond: Cond) -> torch.Tensor:
        """The denoiser's output for noisy latents at ``timesteps`` under the prompt conditioning."""
        return denoiser(noisy, timesteps, encoder_hidden_states=cond).sample

    def objective(self, c: Components):
        """Noising, target and loss weights of this family's training (``tuner.models.objectives``)."""

        return NoiseObjective(c.noise_scheduler, c.prediction_type, self.predict)

    def noise_target(self, c: Components, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor):
        """What the denoiser is trained to predict at these timesteps (the objective's target)."""
        return self.objective(c).target(latents, noise, timesteps)

    # --- sampling ------------------------------------------------------------------------------
    def pipeline(self, c: Components):
        """The family's pipeline over the in-memory components, sampling with its scheduler for inference."""
        settings = {**c.extra.get("pipeline_config", {}), **self.pipeline_extras()}
        pipe = self.pipeline_class()(**self.pipeline_modules(c), scheduler=self.sampling_scheduler(c), **settings)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def pipeline_modules(self, c: Components) -> dict:
        return {c.denoiser_name: c.denoiser, "vae": c.vae, **c.text_encoders, **c.tokenizers}

    def pipeline_extras(self) -> dict:
        """Constructor arguments of the pipeline class beyond its modules (no safety checker, ...)."""
        return {}

    def sampling_scheduler(self, c: Components):
        """The sampler when none is named: the base folder's own scheduler where this family's pipeline draws
        with it, else ``DEFAULT_SCHEDULER``; from the base's scheduler config (``samplers.default``)."""
        return samplers.scheduler(samplers.default(self, c).name, self, c.noise_scheduler.config)

    def sampling_settings(self) -> dict:
        """Scheduler settings every sampler of this family takes beyond the base's config."""
        return {}

    def call_kwargs(self) -> dict:
        """Extra keyword arguments of every pipeline call (the gallery's and the tests')."""
        return {}

    def guidance_kwargs(self, scale: float) -> dict:
        """The pipeline call's arguments for a sampling guidance scale (Qwen-Image's is ``true_cfg_scale``)."""
        return {"guidance_scale": scale}

    def decode(self, pipe, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Images in [-1, 1] from the latents a pipeline returns with ``output_type="latent"``."""
        vae = pipe.vae
        latents = latents.to(vae.dtype) / vae.config.scaling_factor + (vae.config.get("shift_factor") or 0.0)
        return vae.decode(latents).sample

    def img2img(self, pipe):
        """The image-to-image pipeline over the same modules."""
        if self.IMG2IMG is None:
            raise ConfigError(f"generate.init_image: model={self.NAME} has no image-to-image pipeline in tuner")
        return _class("diffusers", self.IMG2IMG)(**pipe.components)

    # --- exports -------------------------------------------------------------------------------
    def save_lora(self, folder: Path, layers: dict[str, tuple[dict, dict]]) -> Path:
        """Write ``pytorch_lora_weights.safetensors`` the way diffusers itself does, each LoRA config in its metadata.

        Args:
            layers: ``{component name: (peft state dict, LoraConfig as a dict)}``.
        """
        kwargs = {}
        for name, (state, config) in layers.items():
            kwargs[f"{name}_lora_layers"] = state
            kwargs[f"{name}_lora_adapter_metadata"] = config
        self.pipeline_class().save_lora_weights(folder, safe_serialization=True, **kwargs)
        return folder / "pytorch_lora_weights.safetensors"

    def kohya_module_name(self, component: str, name: str, config) -> str:
        """A module's name as kohya's format spells it, given its component's name and config."""
        return name

    def kohya_siblings(self, component: str, name: str) -> tuple[str, ...] | None:
        """The modules kohya's format fuses with this one into ``kohya_module_name``, in order (None: not fused)."""
        return None

    def kohya_swapped(self, component: str, name: str, config) -> bool:
        """Whether kohya's format holds this module's output rows with their two halves swapped."""
        return False

    def single_file_state(self, modules: dict, vocab_sizes: dict[str, int]) -> dict:
        raise ConfigError(f"export.formats: single_file is not written for model={self.NAME}")


def _ids(tokenizer, prompts: list[str], length: int) -> torch.Tensor:
    """Token ids padded to ``length``, a new token of several vectors (``<sks>``, ``<sks>_1``, ...) written out
    in full first, as diffusers' pipelines do (``maybe_convert_prompt``)."""
    from diffusers.loaders.textual_inversion import TextualInversionLoaderMixin

    prompts = TextualInversionLoaderMixin().maybe_convert_prompt(list(prompts), tokenizer)
    return tokenizer(prompts, padding="max_length", max_length=length, truncation=True, return_tensors="pt").input_ids
