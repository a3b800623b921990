"""What the flow-matching transformer families (Flux.1 and 2, SD3, Qwen-Image, Chroma, Z-Image, Lumina 2) share: a
transformer trained by flow matching (``tuner.models.objectives.FlowObjective``), sampled with the flow schedulers, at
1024 px, and the prompts of those read by a chat language model (``chat_ids``)."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from tuner.errors import ConfigError
from tuner.models.base import Components, Family
from tuner.models.objectives import FlowObjective


class FlowFamily(Family):
    """What the flow-matching transformer families share."""

    DENOISER = "transformer"
    TRAINING_SCHEDULER = "FlowMatchEulerDiscreteScheduler"
    FLOW = True
    DEFAULT_SCHEDULER = "flow_euler"
    EXPORTS = ("diffusers", "peft", "merged")
    RESOLUTION_MULTIPLE = 16
    DEFAULT_RESOLUTION = 1024
    MAX_SEQUENCE_LENGTH = 512  # the pipeline's default T5 prompt length

    def prediction(self, c: Components, override: str | None) -> str:
        if override not in (None, "flow"):
            raise ConfigError(f"model.prediction_type={override}: model={self.NAME} trains by flow matching")
        return "flow"

    def objective(self, c: Components):

        m = self.model
        return FlowObjective(
            c.noise_scheduler,
            self.predict,
            weighting=m.weighting_scheme,
            logit_mean=m.logit_mean,
            logit_std=m.logit_std,
            mode_scale=m.mode_scale,
            shift=m.timestep_shift,
        )

    @property
    def max_sequence_length(self) -> int:
        return self.model.max_sequence_length or self.MAX_SEQUENCE_LENGTH

    def call_kwargs(self) -> dict:
        return {"max_sequence_length": self.max_sequence_length}

    def chat_ids(self, tokenizer, prompts: list[str], **switches) -> dict[str, torch.Tensor]:
        """Each prompt as the user's turn of the tokenizer's chat template with the assistant's turn opened
        (``switches``: the template's, e.g. ``enable_thinking``), padded to ``max_sequence_length``, and its mask:
        the prompts of the families read by a chat language model's hidden states."""
        texts = [
            tokenizer.apply_chat_template(
                [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True, **switches
            )
            for p in prompts
        ]
        inputs = tokenizer(
            texts, return_tensors="pt", padding="max_length", truncation=True, max_length=self.max_sequence_length
        )
        return {"text_encoder": inputs["input_ids"], "text_encoder_mask": inputs["attention_mask"]}


class StandInProcessor:
    """What a processor standing in for a transformers one that needs torchvision (Qwen-Image 2.1's Qwen3-VL,
    Qwen-Image-Edit's Qwen2.5-VL) shares: put first among its bases. It saves the configs of the parts it leaves
    out from the folder it was read from (``source``) beside its own, keeps ``source`` out of its own config, and
    answers for its tokenizer's vocabulary; ``stand_in`` names it as the class it stands in for, so a folder tuner
    writes names that class as a published one does."""

    source: Path | None = None

    def save_pretrained(self, save_directory, **kwargs):
        out = super().save_pretrained(save_directory, **kwargs)
        for file in Path(self.source).glob("*preprocessor_config.json") if self.source else ():
            if not (Path(save_directory) / file.name).exists():
                shutil.copyfile(file, Path(save_directory) / file.name)
        return out

    def to_dict(self):
        return {k: v for k, v in super().to_dict().items() if k != "source"}

    def get_vocab(self):
        return self.tokenizer.get_vocab()

    def __len__(self):
        return len(self.tokenizer)

    @staticmethod
    def stand_in(cls, real):
        """``cls`` under ``real``'s name and module."""
        cls.__name__ = cls.__qualname__ = real.__name__
        cls.__module__ = real.__module__
        return cls
