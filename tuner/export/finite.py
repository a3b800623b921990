"""Exported weights are finite: a diverged run's NaN or infinite weights are refused before anything is written
(``check_finite``), and so is a value that a cast to a narrower float (export.dtype, export.single_file_dtype,
export.variant) overflowed to infinity, after the cast (``finite_as``, as each format casts what it writes).
"""

from __future__ import annotations

import torch

from tuner.errors import ConfigError
from tuner.export.tensors import Trained, tuner_layers

# how each setting that narrows what is written names its values, and the values that hold more
_NARROW = {
    "export.dtype": ({torch.float16: "float16", torch.bfloat16: "bfloat16"}, "bfloat16 or export.dtype=float32"),
    "export.single_file_dtype": (
        {torch.float16: "float16", torch.bfloat16: "bfloat16"},
        "bfloat16 or export.single_file_dtype=float32",
    ),
    "export.variant": ({torch.float16: "fp16", torch.bfloat16: "bf16"}, "bf16 or export.variant=null (fp32 only)"),
}


def check_finite(trained: Trained, dtype: torch.dtype = torch.float32) -> None:
    """Refuse to export NaN or infinite weights (a diverged run), or an adapter or embedding tensor that is
    infinite once cast to ``dtype`` (export.dtype: the adapter formats' files), naming the first such tensor.

    Raises:
        ConfigError: naming the module and tensor and the fix; nothing has been written.
    """
    adapter = {f"token {t} ({e})": v for t, by_encoder in trained.tokens.items() for e, v in by_encoder.items()}
    named = {}
    for component, module in trained.components.trainable().items():
        if trained.base_weights:
            named.update({f"{component}.{n}": p for n, p in module.named_parameters()})
        for name, layer in tuner_layers(module).items():
            adapter.update({f"{component}.{name}.{n}": p for n, p in layer.named_parameters() if "base_layer" not in n})
    for name, tensor in (adapter | named).items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise ConfigError(
                f"export: {name} holds NaN or infinite values, so nothing was exported; the training diverged "
                "(lower train.learning_rate, or keep train.nonfinite=stop to stop at the first such step)"
            )
    if dtype != torch.float32:
        finite_as({k: v.detach().to(dtype) for k, v in adapter.items() if v.is_floating_point()}, "export.dtype")


def finite_as(state: dict[str, torch.Tensor], key: str, fmt: str | None = None) -> dict[str, torch.Tensor]:
    """``state``, as cast by the setting ``key``, when every value in it is finite; ``fmt``: the format writing it.

    Raises:
        ConfigError: a value the cast overflowed, naming the tensor, the setting and the values that hold it.
    """
    for name, tensor in state.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            names, fix = _NARROW[key]
            value = names.get(tensor.dtype, str(tensor.dtype).removeprefix("torch."))
            written = f"so {fmt} was not written" if fmt else "so nothing was exported"
            raise ConfigError(
                f"export{f' {fmt}' if fmt else ''}: {name} is infinite as {value} (the largest {value} value is "
                f"{torch.finfo(tensor.dtype).max:.6g}), {written}; set {key}={fix}"
            )
    return state
