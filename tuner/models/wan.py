"""Wan 2.1 text-to-video (``WanPipeline``: T2V 1.3B and 14B), trained on images as one-frame clips.

Wan is a DiT over the latents of its causal 3D VAE (``AutoencoderKLWan``: x8 in space, x4 in time after the first
frame, 16 channels normalised per channel by the VAE config's ``latents_mean`` / ``latents_std``), patched
1x2x2, prompted by UMT5-XXL. A clip of 4k+1 frames is 1 + k latent frames; an image is a one-frame clip, which is
how this family trains today: the VAE encodes (B, 3, 1, H, W), the training latents keep (B, C, h, w), and the
transformer is handed (B, C, 1, h, w) back (``predict`` takes five-dimensional latents too, for clips).

Prompts, as ``WanPipeline._get_t5_prompt_embeds``: the prompt cleaned as the pipeline cleans it (``prompt_clean``:
HTML entities, ftfy where installed, whitespace), UMT5's last hidden state under its mask, each prompt's own
tokens kept and zeros after them up to ``max_sequence_length`` (the pipeline's call defaults to 512). The
transformer takes no mask: the zeros are what it reads. The encoder is frozen and its prompts cached.

Training: flow matching (``noise - latents``) with the transformer's timesteps in [0, 1000], over the schedule
the pipeline samples with: sigmas shifted by the folder's scheduler's ``flow_shift`` (3 for 480p, 5 for 720p, as
Wan-AI ship it; ``model.timestep_shift`` overrides), as musubi-tuner's ``discrete_flow_shift``. Sampling: the
folder's own ``UniPCMultistepScheduler`` on flow sigmas, the pipeline's CFG (``uncond + s * (cond - uncond)``,
negative prompt "" unless given), ``num_frames=1`` for an image (frame 0 of the decoded clip).

Exports: diffusers (``WanPipeline.load_lora_weights``), and kohya's file in Wan's NATIVE names (the original
``WanModel``'s: ``blocks.N.self_attn.q``, ``cross_attn.o``, ``ffn.0``, ...) under ``lora_unet_``, as musubi-tuner
writes it and ComfyUI reads it (ComfyUI maps a LoRA key to ``diffusion_model.<native name>``: a file of diffusers'
names patches nothing there). The single file is the transformer in those native names, as Comfy-Org ship
``wan2.1_t2v_1.3B_bf16.safetensors``; ``WanTransformer3DModel.from_single_file`` reads it.

Not here yet: image-to-video (first-frame conditioning), Wan 2.2's TI2V 5B and A14B's two experts.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from tuner.errors import ConfigError
from tuner.models import tiny
from tuner.models.base import Components
from tuner.models.flow import FlowFamily
from tuner.models.real import RealWidths

# diffusers' module names -> the original WanModel's (ComfyUI's, musubi-tuner's, the single file's); the
# converter diffusers reads single files with (convert_wan_transformer_to_diffusers) maps them back. The two
# norms swap: diffusers' norm2 (before cross-attention, the one with weights) is Wan's norm3
_NATIVE = (
    (".attn1.", ".self_attn."),
    (".attn2.", ".cross_attn."),
    (".to_out.0.", ".o."),
    (".to_q.", ".q."),
    (".to_k.", ".k."),
    (".to_v.", ".v."),
    (".add_k_proj.", ".k_img."),
    (".add_v_proj.", ".v_img."),
    (".norm_added_k.", ".norm_k_img."),
    (".ffn.net.0.proj.", ".ffn.0."),
    (".ffn.net.2.", ".ffn.2."),
    ("condition_embedder.time_embedder.linear_1.", "time_embedding.0."),
    ("condition_embedder.time_embedder.linear_2.", "time_embedding.2."),
    ("condition_embedder.text_embedder.linear_1.", "text_embedding.0."),
    ("condition_embedder.text_embedder.linear_2.", "text_embedding.2."),
    ("condition_embedder.time_proj.", "time_projection.1."),
    ("proj_out.", "head.head."),
)
SCHEDULER = {"prediction_type": "flow_prediction", "use_flow_sigmas": True, "flow_shift": 3.0}  # Wan-AI's 480p


def native_name(name: str) -> str:
    """A diffusers module or parameter name of ``WanTransformer3DModel`` as the original ``WanModel`` names it."""
    name = f".{name}."
    name = re.sub(r"\.norm2\.", ".norm__swap.", name)
    name = re.sub(r"\.norm3\.", ".norm2.", name).replace(".norm__swap.", ".norm3.")
    for ours, theirs in _NATIVE:
        name = name.replace(ours, theirs)
    if name == ".scale_shift_table.":
        name = ".head.modulation."
    name = re.sub(r"^\.(blocks\.\d+)\.scale_shift_table\.$", r".\1.modulation.", name)
    return name[1:-1]


class Wan(FlowFamily):
    NAME = "wan"
    PIPELINE = "WanPipeline"
    DENOISER_CLASS = "WanTransformer3DModel"
    IMG2IMG = None  # WanVideoToVideoPipeline restyles clips; an image's init_image is not offered
    TEXT_ENCODERS = ("text_encoder",)  # UMT5-XXL's encoder
    LORA_TEXT_ENCODERS = ()  # UMT5 stays frozen: WanPipeline loads LoRAs into its transformers only
    EMBEDDINGS = {}
    EMBEDDING_REFUSAL = (
        "UMT5-XXL is read at its last hidden state over a 256k-token multilingual vocabulary, and WanPipeline has no "
        "textual-inversion loader to read an embedding"
    )
    BLOCKS = ("blocks.",)
    PARTIAL_BLOCKS = ("blocks.*.attn1.*",)
    OFFLOAD_BLOCKS = ("WanTransformerBlock",)
    TARGETS = {
        "attn": ["to_q", "to_k", "to_v", "to_out.0"],  # self- and cross-attention (attn1, attn2)
        "attn_ff": ["to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2"],  # musubi-tuner's default
    }
    EXPORTS = ("diffusers", "kohya", "peft", "merged", "single_file")
    DEFAULT_EXPORTS = ("diffusers", "kohya")
    KOHYA_PREFIXES = {"transformer": "lora_unet"}
    # diffusers reads musubi-tuner's lora_unet_ files only when every block has all of q, k, v, o of both
    # attentions and both FFN layers (adapter.targets=attn_ff): tests/test_wan.py loads such a file
    DIFFUSERS_READS_KOHYA = False
    KOHYA_READERS = "ComfyUI / musubi-tuner"
    SINGLE_FILE_TEXT = False  # the transformer alone, as Comfy-Org ship wan2.1_t2v_*_bf16.safetensors
    BASE_VERSION = "wan21"
    MODELSPEC_ARCHITECTURE = "wan2.1-t2v"
    MAX_SEQUENCE_LENGTH = 512  # WanPipeline.__call__'s default
    DEFAULT_RESOLUTION = 480  # 480p: Wan 2.1's training size (832 x 480 clips); 1.3B draws only 480p
    RESOLUTION_MULTIPLE = 16  # the VAE's x8 and the transformer's 2x2 patches
    WIDTHS = frozenset({1536, 5120})  # 1.3B's and 14B's transformer
    # its blocks by diffusers' names (attn1/attn2/ffn straight under blocks.N) and by the original's
    SIGNS = (
        r"(?:^|\s)(?:transformer_|lora_unet_|diffusion_model_)blocks_\d+_"
        r"(attn[12]_to_|ffn_net_|self_attn_|cross_attn_|ffn_[02])"
    )
    # the blocks of the MMDiT and DiT families (SD3 Medium is as wide as Wan 1.3B) and their attention's names
    NEVER = r"(?<=[a-z]_)(transformer_blocks|joint_blocks|single_blocks|double_blocks)_\d|_attn_(to_|qkv)"
    SAMPLE_FILES = (
        {"transformer.blocks.0.attn1.to_q": (4, 5120), "transformer.blocks.0.ffn.net.0.proj": (4, 5120)},
        {"lora_unet_blocks_0_self_attn_q": (4, 5120), "lora_unet_blocks_0_cross_attn_k": (4, 5120)},  # musubi
        {"diffusion_model.blocks.29.cross_attn.o": (4, 1536)},  # ComfyUI's own keys (1.3B)
    )
    TINY_OPTIONS = ("model.max_sequence_length=32",)
    # its condition embedder casts the time to its time embedder's weight dtype: NF4's packed bytes would not do
    QUANTIZE_KEEP = ("condition_embedder.time_embedder",)
    REAL_SIZES = ("1.3B",)

    # --- tiny and real-width models --------------------------------------------------------------------------
    def build_tiny(self, seed: int = 0, size: str = "test") -> dict:
        """A tiny Wan 2.1: two blocks 24 wide over a 16-channel AutoencoderKLWan (x8, x4 in time), a one-layer
        UMT5 encoder, a character T5 tokenizer, Wan-AI's UniPC scheduler on flow sigmas (shift 3)."""
        from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanTransformer3DModel
        from transformers import UMT5Config, UMT5EncoderModel

        torch.manual_seed(seed)
        transformer = WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16, out_channels=16,
            text_dim=32, freq_dim=32, ffn_dim=32, num_layers=2, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
        )  # fmt: skip
        torch.manual_seed(seed + 1)
        vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                               temperal_downsample=[False, True, True])  # fmt: skip
        vae.register_to_config(sample_size=32)  # what data.resolution defaults to on the tiny folder (Wan's: 480)
        torch.manual_seed(seed + 2)
        tokenizer = tiny.t5_tokenizer(64)
        config = UMT5Config(vocab_size=len(tokenizer) + 4, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4,
                            relative_attention_num_buckets=8, is_encoder_decoder=False)  # fmt: skip
        return {
            "transformer": transformer,
            "vae": vae,
            "text_encoder": UMT5EncoderModel(config),
            "tokenizer": tokenizer,
            "scheduler": UniPCMultistepScheduler(**SCHEDULER),
        }

    def real_widths(self, size: str | None = None) -> RealWidths:
        """Wan 2.1 14B's transformer by blocks (40, 5120 wide; ``size="1.3B"``: 30, 1536 wide), UMT5-XXL's encoder,
        the 16-channel VAE; a step of an 81-frame clip (21 latent frames) at ``resolution`` x 832/480 of it."""
        from diffusers import WanTransformer3DModel

        heads, ffn, depth = (12, 8960, 30) if size == "1.3B" else (40, 13824, 40)

        def transformer(units):
            return WanTransformer3DModel(num_attention_heads=heads, attention_head_dim=128, in_channels=16,
                                         out_channels=16, text_dim=4096, ffn_dim=ffn, num_layers=units,
                                         cross_attn_norm=True, qk_norm="rms_norm_across_heads")  # fmt: skip

        def inputs(resolution, batch, dtype):
            h, w = resolution // 8, (resolution * 832 // 480) // 16 * 2
            return {
                "hidden_states": torch.randn(batch, 16, 21, h, w, dtype=dtype),
                "timestep": torch.rand(batch) * 1000,
                "encoder_hidden_states": torch.randn(batch, self.max_sequence_length, 4096, dtype=dtype),
            }

        def text_encoders():
            from transformers import UMT5Config, UMT5EncoderModel

            config = UMT5Config(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                                feed_forward_proj="gated-gelu", is_encoder_decoder=False)  # fmt: skip
            return [UMT5EncoderModel(config)]

        def vae():
            from diffusers import AutoencoderKLWan

            return _OneFrame(AutoencoderKLWan())

        published = {} if size == "1.3B" else {
            "Wan 2.1 14B LoRA 480p x 81 frames, 480 px target": "<= 24 GB",
            "diffusion-pipe Wan 2.2 A14B (one expert) fp8 + 32 blocks swapped": "24 GB",
            "ai-toolkit Wan 2.2 A14B 4-bit": "24 GB",
        }  # fmt: skip
        return RealWidths(transformer, depth, inputs, text_encoders, vae, unit="a block", published=published)

    # --- loading ---------------------------------------------------------------------------------------------
    def check_folder(self, path, allow_pickle: bool = False) -> Path:
        """As every family's; a Wan 2.2 folder (A14B's two experts, TI2V 5B's per-token time) refused by name:
        tuner trains Wan 2.1's single transformer so far."""
        index = Path(path).expanduser() / "model_index.json"
        config = json.loads(index.read_text()) if index.is_file() else {}
        expert = config.get("transformer_2") not in (None, [None, None]) or config.get("boundary_ratio") is not None
        if expert or config.get("expand_timesteps"):
            what = "A14B's two experts (transformer_2, boundary_ratio)" if expert else "TI2V 5B (expand_timesteps)"
            raise ConfigError(f"model.path={path} is Wan 2.2 {what}: model=wan trains Wan 2.1 T2V (1.3B, 14B) so far")
        return super().check_folder(path, allow_pickle)

    def load(self, path, prediction_type=None, allow_pickle=False) -> Components:
        """As every family's; the training scheduler is flow matching's at the folder's ``flow_shift`` (its UniPC's
        flow sigmas), and keeps that UniPC's settings, from which the base's own sampler is built again."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        c = super().load(path, prediction_type, allow_pickle)
        saved = json.loads((Path(path).expanduser() / "scheduler" / "scheduler_config.json").read_text())
        shift = float(saved.get("flow_shift") or saved.get("shift") or 1.0)
        c.noise_scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=saved.get("num_train_timesteps", 1000),
                                                            shift=shift)  # fmt: skip
        own = {k: v for k, v in saved.items() if not k.startswith("_") and k not in c.noise_scheduler.config}
        c.noise_scheduler.register_to_config(**own)
        return c

    # --- prompts ---------------------------------------------------------------------------------------------
    def tokenize(self, c: Components, prompts: list[str]) -> dict[str, torch.Tensor]:
        """The cleaned prompts' ids and mask at ``max_sequence_length`` (``WanPipeline._get_t5_prompt_embeds``)."""
        from diffusers.pipelines.wan.pipeline_wan import prompt_clean

        tokens = c.tokenizer(
            [prompt_clean(p) for p in prompts], padding="max_length", max_length=self.max_sequence_length,
            truncation=True, add_special_tokens=True, return_attention_mask=True, return_tensors="pt",
        )  # fmt: skip
        return {"text_encoder": tokens.input_ids, "text_mask": tokens.attention_mask}

    def encode_ids(self, text_encoders: dict, ids: dict) -> dict[str, torch.Tensor]:
        """UMT5's last hidden state under the mask, zero past each prompt's tokens."""
        encoder = text_encoders["text_encoder"]
        device = next(encoder.parameters()).device
        mask = ids["text_mask"].to(device)
        hidden = encoder(ids["text_encoder"].to(device), mask).last_hidden_state
        rest = {k: v for k, v in ids.items() if k not in ("text_encoder", "text_mask")}
        return {**rest, "prompt_embeds": hidden * mask.unsqueeze(-1).to(hidden.dtype)}

    def call_kwargs(self) -> dict:
        return {"max_sequence_length": self.max_sequence_length, "num_frames": 1}

    # --- latents ---------------------------------------------------------------------------------------------
    def encode_images(self, vae, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dist = vae.encode(images.unsqueeze(2)).latent_dist  # one frame
        return dist.mean[:, :, 0], dist.std[:, :, 0]

    def predict(self, denoiser, noisy, timesteps, cond):
        """The transformer as the pipeline calls it: (B, C, F, h, w) latents (an image: one frame), the scheduler's
        timesteps in [0, 1000], the prompts' padded states."""
        clip = noisy if noisy.ndim == 5 else noisy.unsqueeze(2)
        out = denoiser(hidden_states=clip, timestep=timesteps.to(noisy.dtype),
                       encoder_hidden_states=cond["prompt_embeds"], return_dict=False)[0]  # fmt: skip
        return out if noisy.ndim == 5 else out[:, :, 0]

    def decode(self, pipe, latents, height, width):
        """Frame 0 of the clip the pipeline's latents decode to, in [-1, 1]."""
        vae = pipe.vae
        scale, shift = (x.view(1, -1, 1, 1, 1).to(latents.device) for x in self.latent_normalization(vae))
        z = (latents.float() / scale + shift).to(vae.dtype)
        return vae.decode(z).sample[:, :, 0]

    # --- exports ---------------------------------------------------------------------------------------------
    def kohya_module_name(self, component: str, name: str, config) -> str:
        return native_name(name)

    def single_file_state(self, modules: dict, vocab_sizes: dict[str, int]) -> dict:
        """The transformer in the original WanModel's names: the single file Comfy-Org ship, which ComfyUI's Load
        Diffusion Model and ``WanTransformer3DModel.from_single_file`` read."""
        return {native_name(k): v for k, v in modules["transformer"].state_dict().items()}


class _OneFrame(torch.nn.Module):
    """Wan's VAE encoding images (B, 3, H, W) as one-frame clips (the memory plan's encoding step)."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def encode(self, images):
        return self.vae.encode(images.unsqueeze(2))
