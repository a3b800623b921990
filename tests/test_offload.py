"""Frozen weights in host memory (tuner/training/offload.py): ``train.offload_blocks`` gives the gradients it
would give without, holds no more than its window of blocks on the device between the forward and the
backward pass, and fetches them again in reverse; ``model.offload_frozen`` parks the encoders and the VAE.

On a CPU the host and the device are the same memory, but the "device copy" is a real copy: every path
but the CUDA stream runs here."""

from __future__ import annotations

import copy
import weakref

import pytest
import torch

from tests.helpers import train_in_process
from tuner.compose import compose
from tuner.errors import ConfigError
from tuner.training.offload import BlockOffload, blocks_of, largest


@pytest.fixture(scope="module")
def lora_unet(tiny_pipeline_dir):
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig, inject_adapter_in_model

    unet = UNet2DConditionModel.from_pretrained(tiny_pipeline_dir / "unet").requires_grad_(False)
    config = LoraConfig(r=4, target_modules=["to_q", "to_v", "conv1"], init_lora_weights=False)
    return inject_adapter_in_model(config, unet).train()


def _loss(unet) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    c = unet.config
    sample = torch.randn(2, c.in_channels, 16, 16, generator=g)
    context = torch.randn(2, 7, c.cross_attention_dim, generator=g)
    return unet(sample, torch.tensor([10, 600]), context).sample.square().mean()


def _grads(unet) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in unet.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("checkpointing", [False, True])
def test_offloaded_blocks_give_the_same_gradients_and_only_the_window_stays_between_passes(lora_unet, checkpointing):
    unet = copy.deepcopy(lora_unet)
    if checkpointing:
        unet.enable_gradient_checkpointing()
    _loss(unet).backward()
    expected = _grads(unet)
    unet.zero_grad(set_to_none=True)
    frozen = {n: p.detach().clone() for n, p in unet.named_parameters() if not p.requires_grad}

    blocks = blocks_of(unet, ("ResnetBlock2D", "BasicTransformerBlock"))
    assert len(blocks) >= 8
    offload = BlockOffload(blocks, torch.device("cpu"), checkpointed=checkpointing)
    copies = []  # every device copy made, weakly: which are still held after the forward pass
    fetch = offload._fetch

    def counted(i):
        fetch(i)
        copies.extend(weakref.ref(t) for t in offload.resident[i][0])

    offload._fetch = counted
    offload.install()
    loss = _loss(unet)
    forward = list(offload.loads)
    assert sorted(forward) == list(range(len(blocks)))  # each block fetched once, in the order they ran
    per_block = len(copies) / len(blocks)
    alive = sum(ref() is not None for ref in copies)
    # autograd keeps none of them (saved as a note and fetched again, or recomputed): only the window's
    assert alive <= BlockOffload.WINDOW * per_block * 1.5, (alive, len(copies))
    loss.backward()
    backward = offload.loads[len(forward) :]
    assert backward == [i for i in reversed(offload.order) if i in backward]  # fetched again, last block first
    assert len(backward) >= len(blocks) - BlockOffload.WINDOW
    got = _grads(unet)
    assert got.keys() == expected.keys() and len(got) > 0
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=0, msg=name)
    offload.remove()
    assert not any(b._forward_pre_hooks or b._forward_hooks for b in blocks)
    for name, p in unet.named_parameters():
        if not p.requires_grad:
            assert type(p) is torch.nn.Parameter and torch.equal(p, frozen[name]), name


def test_the_blocks_offloaded_are_those_holding_the_most_frozen_bytes(lora_unet):
    blocks = blocks_of(lora_unet, ("ResnetBlock2D", "BasicTransformerBlock"))
    size = [sum(p.numel() for p in b.parameters() if not p.requires_grad) for b in blocks]
    chosen = largest(blocks, 3)
    assert len(chosen) == 3
    assert min(size[blocks.index(b)] for b in chosen) >= max(s for b, s in zip(blocks, size) if b not in chosen)


def test_a_run_with_offloaded_blocks_and_parked_encoders_trains_the_same_adapter(tmp_path, tiny_pipeline_dir):
    from peft.utils import get_peft_model_state_dict

    plain = train_in_process(tmp_path, tiny_pipeline_dir, "text_encoder.train=lora", name="plain")
    both = ["train.offload_blocks=5", "model.offload_frozen=true"]
    off = train_in_process(tmp_path, tiny_pipeline_dir, "text_encoder.train=lora", *both, name="off")
    assert off.metrics["offload_blocks"]["blocks"] == 5 and off.metrics["offload_blocks"]["gib"] > 0
    assert off.metrics["offload_frozen"]["modules"] == ["vae"]  # the text encoder trains: it stays
    for part in ("unet", "text_encoder"):
        a = get_peft_model_state_dict(plain.components.trainable()[part])
        b = get_peft_model_state_dict(off.components.trainable()[part])
        assert a.keys() == b.keys() and a
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=0, atol=0, msg=key)
    # the model is whole again for the stages after training: no hook left, every weight where it was
    assert not any(m._forward_pre_hooks for m in off.components.unet.modules())


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["train.offload_blocks=-1"], r"train\.offload_blocks=-1"),
        (["train.offload_blocks=2", "adapter=full"], r"offload_blocks.*adapter=full"),
        (["train.offload_blocks=2", "model.quantize=nf4"], r"offload_blocks with model\.quantize=nf4"),
    ],
)
def test_offloading_what_cannot_be_offloaded_is_refused_before_loading(overrides, match):
    from tuner.checks import validate

    with pytest.raises(ConfigError, match=match):
        validate(compose("quickstart", overrides))


def test_more_blocks_than_the_denoiser_has_are_refused_with_the_count(tmp_path, tiny_pipeline_dir):
    with pytest.raises(ConfigError, match=r"train\.offload_blocks=999: this unet has \d+ blocks.*at most \d+"):
        train_in_process(tmp_path, tiny_pipeline_dir, "train.offload_blocks=999")


def test_the_vae_encodes_big_images_alone_and_the_latents_do_not_depend_on_the_batch(tiny_pipeline_dir):
    """The encode phase's memory: at most 512 x 512 pixels go through the VAE at once (its activations grow
    with the pixels), and batching never changes a latent."""
    from diffusers import AutoencoderKL

    from tuner.training.batches import encode_batch, encode_latent_dist

    assert [encode_batch(n, n) for n in (1024, 768, 512, 256, 128, 64)] == [1, 1, 1, 4, 16, 64]
    assert encode_batch(2048, 2048) == 1 and encode_batch(512, 256) == 2
    vae = AutoencoderKL.from_pretrained(tiny_pipeline_dir / "vae")
    images = [torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(i)) * 2 - 1 for i in range(5)]
    images += [torch.rand(3, 48, 32) * 2 - 1]  # another size: a batch of its own
    alone = encode_latent_dist(vae, images, batch_size=1)
    together = encode_latent_dist(vae, images)
    for a, b in zip(alone.mean, together.mean):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_captions_are_encoded_a_few_at_a_time_to_what_one_batch_gives(tiny):
    """The encode phase's memory on the text side: PROMPTS_AT_ONCE captions at a time (T5-XXL's activations at
    512 tokens are large), each caption's embeddings those of one batch of all of them (SDXL: two encoders)."""
    import contextlib

    from tuner.models import get_family
    from tuner.stages.train_inputs import PROMPTS_AT_ONCE, encode_captions

    family = get_family("sdxl")
    c = family.load(tiny("sdxl"))
    texts = [f"a photo of sks {word}" for word in "ball cat dog cup hat box car sun map pen key"]
    assert len(texts) > PROMPTS_AT_ONCE
    items = encode_captions(family, c, texts, contextlib.nullcontext)
    with torch.no_grad():
        whole = family.encode_prompts(c, texts)
    assert len(items) == len(texts) and set(items[0]) == set(whole)
    for i, item in enumerate(items):
        for key, value in item.items():
            torch.testing.assert_close(value, whole[key][i], rtol=1e-5, atol=1e-6, msg=f"{i} {key}")


def test_parked_encoders_come_to_the_device_only_for_what_the_cache_lacks(tmp_path, tiny_pipeline_dir):
    """``model.offload_frozen``: the first run brings the VAE and the text encoder to the device to fill an empty
    cache; a second run of the same images and captions finds everything cached and brings neither (the encode
    phase of a large text encoder is then not paid again), and trains the same adapter."""
    from peft.utils import get_peft_model_state_dict

    shared = [f"cache.dir={tmp_path / 'cache'}", "model.offload_frozen=true"]
    first = train_in_process(tmp_path, tiny_pipeline_dir, *shared, name="first")
    again = train_in_process(tmp_path, tiny_pipeline_dir, *shared, name="again")
    assert first.metrics["offload_frozen"]["brought_to_encode"] == sorted({"vae", *first.components.text_encoders})
    assert first.metrics["cache"]["encoded"]["prompts"] > 0
    assert again.metrics["offload_frozen"]["brought_to_encode"] == []
    assert set(again.metrics["cache"]["encoded"].values()) == {0}
    a, b = (get_peft_model_state_dict(r.components.unet) for r in (first, again))
    assert a.keys() == b.keys() and a
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=0, msg=key)
