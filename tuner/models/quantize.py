"""A quantized frozen base (QLoRA): the linear layers of the denoiser (``model.quantize``) and of the text
encoders (``model.quantize_text_encoders``) become bitsandbytes layers, 4-bit NF4 or 8-bit, which peft's LoRA
layers wrap; the adapters train in full precision on top.

diffusers' own bitsandbytes loading asks for a GPU; this converts modules already loaded, on any device
bitsandbytes runs on (its CPU backend included). Only the training copy is quantized: exports read the base's
own weights again (``stages/export.py``), never this approximation of them.
"""

from __future__ import annotations

import torch

from tuner.choices import Quantize

BLOCK = 64  # bitsandbytes quantizes weights in blocks of this many values: a linear layer must hold whole blocks


def available() -> str | None:
    """Why quantization cannot run here, or None."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as e:
        return f"bitsandbytes is not installed ({e}): pip install bitsandbytes"
    return None


def quantize_linears(
    module: torch.nn.Module, kind: str, device, compute_dtype=torch.float32, keep: tuple[str, ...] = ()
) -> int:
    """Replace every ``torch.nn.Linear`` of ``module`` (weights of whole blocks) by bitsandbytes' layer of
    ``kind``, quantized on ``device``; the number replaced. ``keep``: submodules (by name) left as they are."""
    import bitsandbytes as bnb

    if kind not in Quantize.__members__:
        raise ValueError(f"quantize: {kind!r} is not one of {', '.join(Quantize.__members__)}")
    names = [n for n, m in module.named_modules() if type(m) is torch.nn.Linear and m.weight.numel() % BLOCK == 0]
    names = [n for n in names if not any(n == k or n.startswith(f"{k}.") for k in keep)]
    for name in names:
        linear = module.get_submodule(name)
        bias = linear.bias is not None
        if kind == "nf4":
            q = bnb.nn.Linear4bit(
                linear.in_features, linear.out_features, bias=bias, compute_dtype=compute_dtype, quant_type="nf4"
            )
            q.weight = bnb.nn.Params4bit(linear.weight.data.float(), requires_grad=False, quant_type="nf4")
            # bitsandbytes repacks a 4-bit weight in place for its bf16 CPU kernel the first time an eval-mode
            # layer sees an input without gradients: a frozen base's layers do, mid-training too, and that
            # kernel needs widths it does not check; the training kernels run on any width
            q.support_avx512bf16_for_cpu = False
        else:
            q = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=bias, has_fp16_weights=False)
            q.weight = bnb.nn.Int8Params(linear.weight.data.float(), requires_grad=False, has_fp16_weights=False)
        if bias:
            q.bias = torch.nn.Parameter(linear.bias.data.to(compute_dtype), requires_grad=False)
        q.requires_grad_(False).to(device)  # bitsandbytes quantizes as the weight moves to the device
        parent, _, attr = name.rpartition(".")
        setattr(module.get_submodule(parent) if parent else module, attr, q)
    return len(names)


def is_quantized(module: torch.nn.Module) -> bool:
    """Whether any of ``module``'s layers is a bitsandbytes one."""
    return any(type(m).__module__.startswith("bitsandbytes") for m in module.modules())
