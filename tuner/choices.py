"""The closed vocabularies of the configuration, as Enums the schema (tuner/config.py) types its keys with.

OmegaConf checks a value against its Enum when the config is composed, so ``train.optimizer=adamv`` fails
before anything loads, naming the key and listing the choices. Each member's name is its value, and a
member is a ``str`` (``StrEnum``): code compares it with plain strings, and it prints, hashes and is
written to YAML and JSON as its value.
"""

from __future__ import annotations

from enum import StrEnum


class Choice(StrEnum):
    """A value of a closed vocabulary; shown as the plain string (``'lora'``) in messages and lists."""

    def __repr__(self) -> str:
        return repr(self.value)


def _choices(name: str, *values: str) -> type[Choice]:
    """A vocabulary whose values are not all Python names (``class``)."""
    return Choice(name, [(v, v) for v in values])  # type: ignore[return-value]


Builtin = _choices("Builtin", "digits")
Quantize = _choices("Quantize", "nf4", "int8")
# several processes: each holds the whole model (ddp) or a shard of the trained modules (fsdp: FSDP2)
Strategy = _choices("Strategy", "ddp", "fsdp")  # bitsandbytes' 4-bit NormalFloat, 8-bit (LLM.int8())
PredictionType = _choices("PredictionType", "epsilon", "v_prediction")
# how flow-matching families draw training timesteps and weigh losses (diffusers' SD3 schemes)
WeightingScheme = _choices("WeightingScheme", "none", "logit_normal", "mode", "sigma_sqrt", "cosmap")
SubjectTransform = _choices("SubjectTransform", "mirror", "flip", "rot90", "rot180", "rot270", "transpose")
SourceKind = _choices("SourceKind", "auto", "folder", "imagefolder", "kohya", "hf", "parquet")
Role = _choices("Role", "instance", "class")
Crop = _choices("Crop", "center", "random", "none")
CaptionMissing = _choices("CaptionMissing", "default", "reject")
TriggerPolicy = _choices("TriggerPolicy", "replace", "prefix")
AdapterType = _choices("AdapterType", "lora", "loha", "lokr", "partial_unet", "full", "none")
Targets = _choices("Targets", "attn", "attn_ff", "all_linear", "locon")
# peft's pissa/olora inits rewrite the base weights, which an adapter file cannot carry
AdapterInit = _choices("AdapterInit", "gaussian", "default")
TextEncoderTrain = _choices("TextEncoderTrain", "none", "lora", "full")
Optimizer = _choices("Optimizer", "adamw", "adamw8bit", "prodigy", "sgd")
LrScheduler = _choices("LrScheduler", "constant", "constant_with_warmup", "linear", "cosine", "one_cycle")
Loss = _choices("Loss", "l2", "l1", "huber")
TimestepBias = _choices("TimestepBias", "none", "earlier", "later")
MixedPrecision = _choices("MixedPrecision", "no", "fp16", "bf16")
Dtype = _choices("Dtype", "float32", "float16", "bfloat16")
Variant = _choices("Variant", "fp16", "bf16")
NonFinite = _choices("NonFinite", "stop", "skip")
# which of a metric's values is better (checkpoints.select_mode): min | max
SelectMode = _choices("SelectMode", "min", "max")
# the weights the export stage writes (export.from): the last step's, or the best checkpoint's (checkpoints.select)
ExportFrom = _choices("ExportFrom", "last", "best")
ExportFormat = _choices("ExportFormat", "diffusers", "kohya", "peft", "merged", "single_file")
