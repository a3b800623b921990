"""The step's lean calls (tuner/training/setup.py: ``LeanLora``, ``LeanAttention``) compute what peft's LoRA layers and
diffusers' ``AttnProcessor2_0`` compute, to the bit, forward and backward; every case they do not take goes to the
libraries' own code, and ``remove`` leaves the modules as they were."""

import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from peft import LoraConfig, inject_adapter_in_model

from tuner.training.setup import LeanAttention, LeanLora


class Block(torch.nn.Module):
    def __init__(self, width=16):
        super().__init__()
        self.to_q = torch.nn.Linear(width, width, bias=False)
        self.to_out = torch.nn.Linear(width, width)

    def forward(self, x):
        return self.to_out(torch.relu(self.to_q(x)))


def _lora_block(seed=0, **config):
    torch.manual_seed(seed)
    block = inject_adapter_in_model(LoraConfig(target_modules=["to_q", "to_out"], **config), Block())
    for name, p in block.named_parameters():
        p.requires_grad_("lora_" in name)
        if "lora_B" in name:  # peft starts B at zero: a product of zero shows nothing
            torch.nn.init.normal_(p)
    return block


def _run(module, x, seed=0):
    """Output and the trained tensors' gradients of one forward and backward."""
    torch.manual_seed(seed)  # dropout draws the same
    for p in module.parameters():
        p.grad = None
    out = module(x)
    out.square().sum().backward()
    return out.detach(), [p.grad.clone() for p in module.parameters() if p.requires_grad]


def _same(a, b):
    (out_a, grads_a), (out_b, grads_b) = a, b
    assert torch.equal(out_a, out_b)
    assert len(grads_a) == len(grads_b) and all(torch.equal(g, h) for g, h in zip(grads_a, grads_b))


@pytest.mark.parametrize(
    "config",
    [dict(r=4, lora_alpha=4), dict(r=4, lora_alpha=8), dict(r=4, lora_alpha=4, lora_dropout=0.3)],
    ids=["scaling-1", "scaling-2", "dropout"],
)
def test_lean_lora_is_peft_to_the_bit(config):
    block = _lora_block(**config)
    x = torch.randn(3, 5, 16)
    lean = LeanLora([block])
    assert len(lean.layers) == 2
    peft_result = _run(block, x)
    lean.install()
    assert all("forward" in layer.__dict__ for layer in lean.layers)
    _same(peft_result, _run(block, x))
    lean.remove()
    assert not any("forward" in layer.__dict__ for layer in lean.layers)
    _same(peft_result, _run(block, x))


def test_lean_lora_leaves_other_cases_to_peft(monkeypatch):
    block, dora = _lora_block(r=4, lora_alpha=4), _lora_block(r=4, lora_alpha=4, use_dora=True)
    x = torch.randn(2, 16)
    dora_result = _run(dora, x)
    lean = LeanLora([block, dora])
    assert len(lean.layers) == 4
    cls = type(lean.layers[0])
    own, calls = cls.forward, []
    monkeypatch.setattr(cls, "forward", lambda self, *a, **k: calls.append(1) or own(self, *a, **k))
    lean.install()
    try:
        block(x)
        assert calls == []  # the plain case is lean's
        _same(dora_result, _run(dora, x))
        assert len(calls) == 2  # a variant (DoRA): peft's
        for layer in (block.to_q, block.to_out):
            layer.enable_adapters(False)
        with torch.no_grad():
            assert torch.equal(block(x), block.to_out.base_layer(torch.relu(block.to_q.base_layer(x))))
        assert len(calls) == 4  # adapters disabled: peft's
        for layer in (block.to_q, block.to_out):
            layer.enable_adapters(True)
        block.to_q(x, adapter_names=["default", "default"])  # extra arguments: peft's
        assert len(calls) == 5
        block.to_q.merge()
        block.to_q(x)  # merged: peft's
        assert len(calls) == 6
    finally:
        lean.remove()


@pytest.mark.parametrize(
    "cross,residual,rescale,ndim",
    [
        (False, False, 1.0, 3),
        (True, False, 1.0, 3),
        (False, False, 2.0, 3),
        (False, True, 1.0, 3),
        (False, False, 1.0, 4),
    ],
    ids=["self", "cross", "rescaled", "residual", "spatial"],
)
def test_lean_attention_is_diffusers_to_the_bit(cross, residual, rescale, ndim):
    torch.manual_seed(0)
    attention = Attention(
        16, cross_attention_dim=8 if cross else None, heads=2, dim_head=8,
        residual_connection=residual, rescale_output_factor=rescale,
    )  # fmt: skip
    attention.set_processor(AttnProcessor2_0())
    own = attention.processor
    for name, p in attention.named_parameters():
        p.requires_grad_(name.startswith("to_"))
    x = torch.randn(2, 16, 3, 4) if ndim == 4 else torch.randn(2, 12, 16)
    context = torch.randn(2, 7, 8) if cross else None

    class Call(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attention = attention

        def forward(self, x):
            return self.attention(x, encoder_hidden_states=context)

    module = Call()
    lean = LeanAttention([module])
    assert list(lean.kept) == [attention]
    result = _run(module, x)
    lean.install()
    assert attention.processor is not own and isinstance(attention.processor, AttnProcessor2_0)
    _same(result, _run(module, x))
    lean.remove()
    assert attention.processor is own
    _same(result, _run(module, x))
