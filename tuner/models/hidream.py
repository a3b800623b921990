"""HiDream-I1: HiDream.ai's 17B sparse DiT (``HiDreamImageTransformer2DModel``: 16 dual-stream and 32 single-stream
blocks, 2560 wide, each feed-forward of the image stream a mixture of experts: a shared SwiGLU and 4 routed ones, 2
chosen per token) over 2x2 patches of Flux's 16-channel VAE latents, prompted by four encoders; Full (the base), Dev
and Fast (distilled).

Prompts, as ``HiDreamImagePipeline.encode_prompt``: the pooled conditioning is both CLIPs' projected outputs side by
side (CLIP-L and CLIP-G, HiDream's long CLIPs: padded to ``min(max_sequence_length, 218)`` tokens); T5's last hidden
states (``min(max_sequence_length, model_max_length)`` tokens, masked); and every hidden state of Llama 3.1 8B
Instruct after its embeddings (``hidden_states[1:]``, stacked: 32 of them), the prompt padded with its end token. The
transformer reads one Llama layer per block (its config's ``llama_layers``) beside T5's tokens. tuner caches the
Llama states batch first (B, layers, tokens, width) and hands the transformer the pipeline's (layers, B, ...).

The transformer reads timesteps in [0, 1000] and predicts ``latents - noise``, which the pipeline negates before its
scheduler steps; ``predict`` negates it too, so the family trains on flow matching's ``noise - latents`` as diffusers'
DreamBooth script does, at its shift of 3 (the script loads the scheduler with ``shift=3.0`` whatever the folder's,
as HiDream-I1-Full's own sampler is a flow UniPC at shift 3). Latents are ``(z - shift_factor) * scaling_factor``.

The experts: in training mode the transformer routes each token through its chosen experts with gradients (and
returns its patches in another layout, which ``predict`` puts back); diffusers' script instead loads the transformer
with ``force_inference_output=True``, whose routed experts run under ``no_grad`` (only the shared expert and the
residual carry gradients past them). tuner trains through the experts. LoRA presets: ``attn`` is the script's default
(``to_q``, ``to_k``, ``to_v``, ``to_out``: the image stream's attention, not the ``*_t`` text projections); ``attn_ff``
adds the text projections and every SwiGLU (``w1``/``w2``/``w3``: the shared and each routed expert, peft wraps them
all; the gate is a bare parameter and stays frozen).

Sampling: the pipeline's CFG (``guidance_scale > 1``: negative prompt "" unless given), and the pipeline's own
resolution rule: it draws at the area of ``default_sample_size`` latents squared (1024 px on HiDream), the requested
aspect kept. Its ``default_sample_size`` is 128, HiDream's ``max_resolution``: tuner sets it from the transformer's
config (the same number on the real model, 32 px on the tiny one).

HiDream-I1 Dev and Fast are distilled (guidance-free, 28 and 16 steps): refused as training bases.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
import torch.nn.functional as F

from tuner.errors import ConfigError
from tuner.models import real, tiny
from tuner.models.base import Components, _ids
from tuner.models.flow import FlowFamily
from tuner.models.real import RealWidths

DISTILLED = (
    "HiDream-I1 Dev and Fast are distilled from Full (no CFG, 28 and 16 steps): a LoRA trained on them undoes the "
    "distillation. Train on Full, run on Dev/Fast (recipe=generate model.path=<Dev or Fast folder> "
    "generate.adapters=[...] generate.guidance_scale=0)"
)
NO_LLAMA = (
    "HiDream-ai's folders leave Llama 3.1 8B Instruct out; save a folder with it in once: "
    "HiDreamImagePipeline.from_pretrained(FULL, text_encoder_4=LlamaForCausalLM.from_pretrained(LLAMA), "
    "tokenizer_4=AutoTokenizer.from_pretrained(LLAMA)).save_pretrained(FOLDER), then model.path=FOLDER"
)
TRAINING_SHIFT = 3.0  # diffusers' train_dreambooth_lora_hidream.py: FlowMatchEulerDiscreteScheduler(shift=3.0)
CLIP_TOKENS = 218  # the pipeline's cap on the CLIPs' prompt length
LLAMA_LAYERS = 32  # Llama 3.1 8B's hidden states after the embeddings


class HiDream(FlowFamily):
    NAME = "hidream"
    PIPELINE = "HiDreamImagePipeline"
    DENOISER_CLASS = "HiDreamImageTransformer2DModel"
    IMG2IMG = None  # diffusers has no HiDream-I1 image-to-image pipeline
    TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3", "text_encoder_4")  # CLIP-L, CLIP-G, T5, Llama
    LORA_TEXT_ENCODERS = ()  # HiDreamImageLoraLoaderMixin loads LoRAs into the transformer only
    EMBEDDINGS = {}
    EMBEDDING_REFUSAL = "diffusers' HiDreamImagePipeline has no textual-inversion loader to read the embedding"
    BLOCKS = ("double_stream_blocks.", "single_stream_blocks.")
    PARTIAL_BLOCKS = ("*stream_blocks.*.block.attn1.*",)  # every block's attention
    OFFLOAD_BLOCKS = ("HiDreamBlock",)
    TARGETS = {
        "attn": ["to_q", "to_k", "to_v", "to_out"],  # diffusers' DreamBooth script's default
        "attn_ff": ["to_q", "to_k", "to_v", "to_out", "to_q_t", "to_k_t", "to_v_t", "to_out_t", "w1", "w2", "w3"],
    }
    # the pipeline hands every scheduler but UniPC ``mu=``: FlowMatch Heun's set_timesteps takes no mu, and DPM-Solver
    # asserts it is dynamically shifted (which a flow-sigmas DPM-Solver is not)
    NO_SCHEDULERS = ("flow_heun", "flow_dpm++")
    EXPORTS = ("diffusers", "kohya", "peft", "merged", "single_file")
    DEFAULT_EXPORTS = ("diffusers", "kohya")
    SINGLE_FILE_TEXT = False
    # ComfyUI's HiDream model keeps the original's names, which are diffusers' (diffusers' single-file converter only
    # strips "model.diffusion_model."): its generic rule reads lora_unet_<module, dots as _>
    KOHYA_PREFIXES = {"transformer": "lora_unet"}
    DIFFUSERS_READS_KOHYA = False  # diffusers reads HiDream's "diffusion_model." files, not lora_unet_ ones
    KOHYA_READERS = "ComfyUI"  # InvokeAI 6.14 has no HiDream base
    BASE_VERSION = "hidream_i1"
    MODELSPEC_ARCHITECTURE = "hidream-i1"  # the OMI model spec's (hidream-i1/lora)
    MAX_SEQUENCE_LENGTH = 128  # the pipeline's and the script's default, for T5 and Llama
    WIDTHS = frozenset({2560})  # the transformer's (20 heads of 128)
    SIGNS = r"double_stream_blocks|single_stream_blocks"
    SAMPLE_FILES = (
        {"transformer.double_stream_blocks.0.block.attn1.to_q": (4, 2560)},
        {"lora_unet_double_stream_blocks_0_block_attn1_to_q": (4, 2560), "lora_unet_x_embedder_proj": (4, 64)},
    )
    TINY_OPTIONS = ("model.max_sequence_length=32",)
    CLIENTS = {"comfyui": {"model": "HiDream"}}

    # --- tiny and real-width models --------------------------------------------------------------------------
    def build_tiny(self, seed: int = 0, size: str = "test") -> dict:
        """A tiny HiDream-I1: one dual- and one single-stream block 16 wide, each image feed-forward two routed
        experts (one chosen per token) and a shared one, two long-position CLIPs with projections, a T5, a two-layer
        Llama with a tokenizer of Llama 3's special tokens, a 16-channel VAE, shift-3 flow matching; its
        ``max_resolution`` of 4 latents draws at 32 px."""
        from diffusers import FlowMatchEulerDiscreteScheduler, HiDreamImageTransformer2DModel
        from transformers import CLIPTextModelWithProjection, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

        torch.manual_seed(seed)
        transformer = HiDreamImageTransformer2DModel(
            patch_size=2, in_channels=16, out_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8,
            num_attention_heads=2, caption_channels=[32, 16], text_emb_dim=32, num_routed_experts=2,
            num_activated_experts=1, axes_dims_rope=(4, 2, 2), max_resolution=(4, 4), llama_layers=[0, 1],
        )  # fmt: skip
        torch.manual_seed(seed + 1)
        vae = tiny.tiny_vae(  # Flux's 16-channel VAE at tiny widths (its factors)
            (8, 8, 16, 16), 16, scaling_factor=0.3611, shift_factor=0.1159, mid_block_add_attention=False
        )
        torch.manual_seed(seed + 2)
        clip = {"projection_dim": 16, "hidden_act": "gelu"}
        llama_tokenizer = tiny.unigram_tokenizer(
            PreTrainedTokenizerFast, ["<|begin_of_text|>", "<|eot_id|>"], "", None,
            bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
        )  # fmt: skip
        from tokenizers import processors

        backend = llama_tokenizer.backend_tokenizer  # Llama 3 prepends its begin token
        backend.post_processor = processors.TemplateProcessing(
            single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", llama_tokenizer.bos_token_id)]
        )
        llama_tokenizer.model_max_length = 131072
        config = LlamaConfig(
            vocab_size=len(llama_tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=128,
            bos_token_id=llama_tokenizer.bos_token_id, eos_token_id=llama_tokenizer.eos_token_id,
        )  # fmt: skip
        return {
            "transformer": transformer,
            "vae": vae,
            "text_encoder": tiny.clip_text(CLIPTextModelWithProjection, 16, 2, 128, **clip),
            "text_encoder_2": tiny.clip_text(CLIPTextModelWithProjection, 16, 2, 128, **clip),
            "text_encoder_3": tiny.t5_encoder(32),
            "text_encoder_4": LlamaForCausalLM(config),
            "tokenizer": tiny.char_tokenizer(32),
            "tokenizer_2": tiny.char_tokenizer(32),
            "tokenizer_3": tiny.t5_tokenizer(32),
            "tokenizer_4": llama_tokenizer,
            "scheduler": FlowMatchEulerDiscreteScheduler(shift=TRAINING_SHIFT, use_dynamic_shifting=False),
        }

    def real_widths(self, size: str | None = None) -> RealWidths:
        """HiDream-I1's transformer by a dual- and two single-stream blocks (16 dual and 32 single in all; each block
        reads one Llama layer), its experts' routing run dense (``_planned``), CLIP-L and CLIP-G with projections,
        T5-XXL, Llama 3.1 8B, Flux's 16-channel VAE."""
        text = self.max_sequence_length

        def transformer(units):
            return _planned()(
                patch_size=2, in_channels=16, out_channels=16, num_layers=units, num_single_layers=2 * units,
                attention_head_dim=128, num_attention_heads=20, caption_channels=[4096, 4096], text_emb_dim=2048,
                num_routed_experts=4, num_activated_experts=2, axes_dims_rope=(64, 32, 32), max_resolution=(128, 128),
                llama_layers=[min(i, LLAMA_LAYERS - 1) for i in range(3 * units)],
            )  # fmt: skip

        def inputs(resolution, batch, dtype):
            side = resolution // 8
            return {
                "hidden_states": torch.randn(batch, 16, side, side, dtype=dtype),
                "timesteps": torch.rand(batch) * 1000,
                "encoder_hidden_states_t5": torch.randn(batch, text, 4096, dtype=dtype),
                "encoder_hidden_states_llama3": torch.randn(LLAMA_LAYERS, batch, text, 4096, dtype=dtype),
                "pooled_embeds": torch.randn(batch, 2048, dtype=dtype),
            }

        def text_encoders():
            from transformers import LlamaConfig, LlamaForCausalLM

            llama = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                                num_key_value_heads=8, vocab_size=128256)  # fmt: skip
            clip_l = real.clip(768, 12, 12, projection=True, projection_dim=768)
            return [clip_l, real.clip(1280, 32, 20, projection=True), real.t5_xxl(), LlamaForCausalLM(llama)]

        published = {
            "diffusers README (LoRA, nf4 transformer)": "36.9 GB",
            "diffusers README (LoRA, bf16)": "59.9 GB",
            "HiDream LoRA nf4 1024 px target": "<= 36.9 GB",
        }
        unit = "a dual- and two single-stream blocks"
        return RealWidths(transformer, 16, inputs, text_encoders, lambda: real.vae(16), unit, published)

    # --- loading ---------------------------------------------------------------------------------------------
    def check_trainable(self, folder: Path) -> None:
        """Refuse HiDream-I1 Dev or Fast (or another distilled HiDream, by its folder's name) as a training base."""
        if re.search(r"(^|[-_. ])(dev|fast)($|[-_. ])|distill", Path(folder).name, re.I):
            raise ConfigError(f"model.path={folder} is a distilled checkpoint (its folder name): {DISTILLED}")

    def check_folder(self, path, allow_pickle: bool = False) -> Path:
        """The shared checks, first that the folder holds Llama: HiDream-ai's folders leave it out (a gated model),
        and the pipeline's example passes it in."""
        folder = Path(path).expanduser()
        if (folder / "model_index.json").is_file() and not (folder / "text_encoder_4").is_dir():
            raise ConfigError(f"model.path={path} has no text_encoder_4/: {NO_LLAMA}")
        return super().check_folder(path, allow_pickle)

    def load(self, path, prediction_type=None, allow_pickle=False) -> Components:
        """The shared loading, the training scheduler at the script's shift of 3 (a Full folder's scheduler is a
        flow UniPC, whose config names no Euler shift), Llama's tokenizer padding with its end token."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        c = super().load(path, prediction_type, allow_pickle)
        c.noise_scheduler = FlowMatchEulerDiscreteScheduler.from_config(c.noise_scheduler.config, shift=TRAINING_SHIFT)
        c.tokenizers["tokenizer_4"].pad_token = c.tokenizers["tokenizer_4"].eos_token
        return c

    def pipeline_with(self, path, **components):
        return _sized(super().pipeline_with(path, **components))

    def pipeline(self, c: Components):
        return _sized(super().pipeline(c))

    # --- prompts ---------------------------------------------------------------------------------------------
    def tokenize(self, c: Components, prompts: list[str]) -> dict[str, torch.Tensor]:
        """As the pipeline: the CLIPs to ``min(length, 218)``, T5 and Llama to ``min(length, their maximum)``."""
        length, prompts = self.max_sequence_length, list(prompts)
        out = {name: _ids(c.tokenizers[tok], prompts, min(length, CLIP_TOKENS))
               for name, tok in (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2"))}  # fmt: skip
        for name, tok in (("text_encoder_3", "tokenizer_3"), ("text_encoder_4", "tokenizer_4")):
            tokenizer = c.tokenizers[tok]
            inputs = tokenizer(prompts, padding="max_length", max_length=min(length, tokenizer.model_max_length),
                               truncation=True, add_special_tokens=True, return_tensors="pt")  # fmt: skip
            out[name], out[f"{name}_mask"] = inputs.input_ids, inputs.attention_mask
        return out

    def encode_ids(self, text_encoders: dict, ids: dict) -> dict[str, torch.Tensor]:
        """Pooled: both CLIPs' projections; T5's last states; Llama's states after the embeddings, batch first."""

        def run(name):
            encoder = text_encoders[name]
            device = next(encoder.parameters()).device
            mask = ids.get(f"{name}_mask")
            return encoder(ids[name].to(device), **({} if mask is None else {"attention_mask": mask.to(device)}))

        pooled = torch.cat([run(n)[0] for n in self.TEXT_ENCODERS[:2]], dim=-1)  # text_embeds (projected)
        t5 = run("text_encoder_3")[0]
        llama = text_encoders["text_encoder_4"]
        body, device = getattr(llama, "model", llama), next(llama.parameters()).device  # no vocabulary logits
        states = body(ids["text_encoder_4"].to(device), attention_mask=ids["text_encoder_4_mask"].to(device),
                      output_hidden_states=True)  # fmt: skip
        layers = torch.stack(states.hidden_states[1:], dim=1)
        rest = {k: v for k, v in ids.items() if not k.startswith("text_encoder")}
        return {**rest, "t5": t5, "llama": layers, "pooled": pooled}

    # --- training --------------------------------------------------------------------------------------------
    def predict(self, denoiser, noisy, timesteps, cond):
        """The transformer as the pipeline calls it, Llama's layers first; its output negated (``noise - latents``);
        in training mode its (B, C, patches, p * p) output put back into latents."""
        out = denoiser(
            hidden_states=noisy,
            timesteps=timesteps,
            encoder_hidden_states_t5=cond["t5"],
            encoder_hidden_states_llama3=cond["llama"].transpose(0, 1),
            pooled_embeds=cond["pooled"],
            return_dict=False,
        )[0]
        config = getattr(denoiser, "config", None)
        if denoiser.training and not getattr(config, "force_inference_output", False):
            p = config.patch_size
            batch, channels, height, width = noisy.shape
            rows, cols = height // p, width // p
            out = out[:, :, : rows * cols].reshape(batch, channels, rows, cols, p, p)
            out = out.permute(0, 1, 2, 4, 3, 5).reshape(batch, channels, height, width)
        return -out

    # --- exports ---------------------------------------------------------------------------------------------
    def single_file_state(self, modules: dict, vocab_sizes: dict[str, int]) -> dict:
        """The transformer by its own names (the original's and ComfyUI's: diffusers' converter only strips the
        "model.diffusion_model." prefix), which ComfyUI's Load Diffusion Model and ``from_single_file`` read."""
        return dict(modules["transformer"].state_dict())


def _sized(pipe):
    """The pipeline drawing at its transformer's ``max_resolution`` (the pipeline's fixed 128 on HiDream-I1)."""
    pipe.default_sample_size = pipe.transformer.config.max_resolution[0]
    return pipe


def _planned():
    """``HiDreamImageTransformer2DModel`` whose experts run dense (every routed expert over every token, weighted by
    the gate's top-k weights, zero elsewhere): diffusers' routing indexes tokens by the gate's choice, shapes fake
    tensors cannot know. The same sums as diffusers' training path (tests/test_hidream.py); the plan counts each
    routed expert's activations over all tokens instead of its share (an upper bound)."""
    from diffusers import HiDreamImageTransformer2DModel
    from diffusers.models.transformers.transformer_hidream_image import MOEFeedForwardSwiGLU

    class DenseExperts(MOEFeedForwardSwiGLU):
        def forward(self, x):
            flat = x.reshape(-1, x.shape[-1])
            scores = F.linear(flat, self.gate.weight).softmax(dim=-1)
            weight, index = torch.topk(scores, k=self.gate.top_k, dim=-1, sorted=False)
            weights = torch.zeros_like(scores).scatter(1, index, weight).to(x.dtype)
            y = sum(expert(flat) * weights[:, i : i + 1] for i, expert in enumerate(self.experts))
            return y.view(x.shape) + self.shared_experts(x)

    class Planned(HiDreamImageTransformer2DModel):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            for module in self.modules():
                if type(module) is MOEFeedForwardSwiGLU:
                    module.__class__ = DenseExperts

    return Planned
