"""Every way of training, end to end on a tiny SD1.x pipeline: only what should train changes, and what
is exported reloads through diffusers (or peft) into the same images the run itself samples."""

import numpy as np
import pytest
import torch

from tests.helpers import PROMPT, image_of, make_photos, sample_like_the_gallery, train_in_process
from tuner.models import get_family

sd15 = get_family("sd15")


def assert_only_trained_changed(run, tiny, new_rows=()):
    """Every tensor the run did not train is bit-identical to the base on disk; each group trained something."""
    base = sd15.load(tiny)
    trained = {id(p) for p in run.adapted.trainables.params}
    for module in ("unet", "text_encoder", "vae"):
        reference = dict(getattr(base, module).named_parameters())
        for name, param in getattr(run.components, module).named_parameters():
            if id(param) in trained:
                continue
            assert torch.equal(param, reference[name.replace(".base_layer", "")]), f"{module}.{name} changed"
    fresh = dict(base.unet.named_parameters()) | {f"te.{k}": v for k, v in base.text_encoder.named_parameters()}
    for group in run.adapted.trainables.groups:
        names = {id(p): n for n, p in run.components.unet.named_parameters()}
        names |= {id(p): f"te.{n}" for n, p in run.components.text_encoder.named_parameters()}
        changed = [
            names[id(p)]
            for p in group["params"]
            if names[id(p)] not in fresh  # an adapter tensor: trained means B is no longer zero, A moved
            or p.shape != fresh[names[id(p)]].shape
            or not torch.equal(p, fresh[names[id(p)]])
        ]
        assert changed, f"group {group['name']} did not change"
    if new_rows:  # textual inversion: only the new rows of the embedding matrix moved
        weight = run.components.text_encoder.get_input_embeddings().weight
        old = base.text_encoder.get_input_embeddings().weight
        assert torch.equal(weight[: len(old)], old)
        assert len(weight) == len(old) + len(new_rows)


def reload(run, tiny):
    """A fresh diffusers pipeline with the run's export applied the way a user would load it."""
    from diffusers import StableDiffusionPipeline
    from peft import PeftModel

    if run.adapted.trainables.base_weights_train:  # the whole model, fused
        return StableDiffusionPipeline.from_pretrained(run.dir / "merged")
    pipe = StableDiffusionPipeline.from_pretrained(tiny)
    folder = run.dir / "diffusers"
    if (folder / "pytorch_lora_weights.safetensors").is_file():
        pipe.load_lora_weights(folder)
    if (run.dir / "peft" / "unet").is_dir() and not (folder / "pytorch_lora_weights.safetensors").is_file():
        pipe.unet = PeftModel.from_pretrained(pipe.unet, run.dir / "peft" / "unet")  # LoHa, LoKr
    for file in sorted((folder / "embeddings").glob("*.safetensors")):
        pipe.load_textual_inversion(file)
    return pipe


CASES = {
    "lora_attention": ["adapter.targets=attn"],
    "locon_dora": ["adapter.targets=locon", "adapter.use_dora=true"],
    "rslora_all_linear": ["adapter.targets=all_linear", "adapter.use_rslora=true", "adapter.alpha=16"],
    "loha": ["adapter=loha"],
    "lokr": ["adapter=lokr", "adapter.rank=4"],
    "partial_unet": [
        "adapter=partial_unet",
        "adapter.blocks=[{pattern:up_blocks.*.attentions.*},{pattern:mid_block.*,lr:1e-3}]",
    ],
    "full": ["adapter=full"],
    "lora_and_text_encoder_lora": ["text_encoder.train=lora", "text_encoder.learning_rate=5e-3"],
    "full_with_text_encoder": ["adapter=full", "text_encoder.train=full"],
    "textual_inversion": [
        "adapter=none",
        "embedding.tokens=['<sks>']",
        "embedding.vectors=2",
        "data.instance_prompt='a photo of <sks> ball'",
    ],
    "shuffled_captions_with_dropout": ["data.shuffle_tags=true", "data.caption_dropout=0.3", "train.max_steps=4"],
    "pivotal_tuning": [
        "embedding.tokens=['<sks>']",
        "embedding.init_words=[ball]",
        "data.instance_prompt='a photo of <sks> ball'",
    ],
}


@pytest.mark.e2e
@pytest.mark.parametrize("case", list(CASES))
def test_each_method_trains_only_its_parameters_and_reloads(tmp_path, tiny_pipeline_dir, case):
    run = train_in_process(tmp_path, tiny_pipeline_dir, *CASES[case])
    tokens = [o for o in CASES[case] if o.startswith("embedding.tokens")]
    new_rows = ["<sks>", "<sks>_1"] if "vectors=2" in " ".join(CASES[case]) else (["<sks>"] if tokens else [])
    assert_only_trained_changed(run, tiny_pipeline_dir, new_rows)
    prompt = run.cfg.data.instance_prompt
    pipe = reload(run, tiny_pipeline_dir)
    expected = image_of(run, prompt)
    got = sample_like_the_gallery(pipe, prompt, seed=0, steps=3)
    assert np.abs(got - expected).max() < 1e-3, f"{case}: the exported model draws another image"
    base = sample_like_the_gallery(sd15.load_pipeline(tiny_pipeline_dir), prompt, seed=0, steps=3)
    assert np.abs(got - base).max() > 1e-3, f"{case}: training changed nothing visible"


def test_text_encoder_only_training_leaves_the_unet_and_changes_the_embeddings(tmp_path, tiny_pipeline_dir):
    run = train_in_process(tmp_path, tiny_pipeline_dir, "adapter=none", "text_encoder.train=lora")
    assert not getattr(run.components.unet, "peft_config", None)
    reference = sd15.load(tiny_pipeline_dir)
    for name, param in run.components.unet.named_parameters():
        assert torch.equal(param, dict(reference.unet.named_parameters())[name]), name
    tuned = sd15.encode_prompts(run.components, [PROMPT])
    assert (tuned - sd15.encode_prompts(reference, [PROMPT])).abs().max() > 1e-4


def test_text_encoder_stops_training_at_its_fraction(tmp_path, tiny_pipeline_dir):
    """stop_at=0.5 of 4 steps: the text encoder's LoRA ends as after 2 steps; the U-Net's goes on."""

    def lora_tensors(run, module):
        from peft.utils import get_peft_model_state_dict

        return get_peft_model_state_dict(getattr(run.components, module))

    both = ["text_encoder.train=lora", "train.weight_decay=0"]
    stopped = train_in_process(tmp_path, tiny_pipeline_dir, *both, "train.max_steps=4", "text_encoder.stop_at=0.5")
    two = train_in_process(tmp_path, tiny_pipeline_dir, *both, "train.max_steps=2", name="two")
    for key, value in lora_tensors(two, "text_encoder").items():
        torch.testing.assert_close(lora_tensors(stopped, "text_encoder")[key], value, rtol=0, atol=1e-6)
    unet_stopped, unet_two = lora_tensors(stopped, "unet"), lora_tensors(two, "unet")
    assert any(not torch.equal(unet_stopped[k], unet_two[k]) for k in unet_two)


def test_partial_unet_groups_carry_their_learning_rates(tmp_path, tiny_pipeline_dir):
    run = train_in_process(
        tmp_path,
        tiny_pipeline_dir,
        "adapter=partial_unet",
        "adapter.blocks=[{pattern:up_blocks.*.attentions.*,lr:2e-3},{pattern:mid_block.*}]",
        "train.max_steps=1",
    )
    groups = {g["name"]: g for g in run.adapted.trainables.groups}
    assert groups["unet up_blocks.*.attentions.*"]["lr"] == 2e-3
    assert groups["unet mid_block.*"]["lr"] == 1e-2  # null: train.learning_rate
    names = {id(p): n for n, p in run.components.unet.named_parameters()}
    assert all(".attentions." in names[id(p)] for p in groups["unet up_blocks.*.attentions.*"]["params"])
    trained = {names[id(p)] for g in run.adapted.trainables.groups for p in g["params"]}
    assert trained and all(n.startswith(("up_blocks", "mid_block")) for n in trained)


def test_a_block_pattern_that_matches_nothing_is_named(tmp_path, tiny_pipeline_dir):
    from tuner.errors import ConfigError

    with pytest.raises(ConfigError, match="upblocks"):
        train_in_process(tmp_path, tiny_pipeline_dir, "adapter=partial_unet", "adapter.blocks=[{pattern:upblocks.*}]")


@pytest.mark.e2e  # two runs: -m e2e keeps the fast tier under 3 minutes
def test_bf16_keeps_trained_weights_fp32_and_matches_fp32_losses(tmp_path, tiny_pipeline_dir):
    """The frozen U-Net runs in bf16, the LoRA stays fp32; the first losses agree with fp32 within 2%."""
    fp32 = train_in_process(tmp_path, tiny_pipeline_dir, "train.max_steps=2", name="fp32")
    bf16 = train_in_process(
        tmp_path,
        tiny_pipeline_dir,
        "train.max_steps=2",
        "train.mixed_precision=bf16",
        name="bf16",
        stages="[base,prepare,train,export,gallery]",
    )
    unet = bf16.components.unet
    dtypes = {("lora_" in n, p.dtype) for n, p in unet.named_parameters()}
    assert dtypes == {(True, torch.float32), (False, torch.bfloat16)}
    assert bf16.components.vae.dtype == torch.float32  # the VAE stays fp32 unless asked
    first32, first16 = fp32.metrics["train_loss"]["first"], bf16.metrics["train_loss"]["first"]
    assert abs(first16 - first32) <= 0.02 * first32, (first32, first16)
    assert (bf16.dir / "gallery" / "grid.png").is_file()  # sampling works on the mixed-precision model


def test_gradient_checkpointing_gives_the_same_adapters(tmp_path, tiny_pipeline_dir):
    from peft.utils import get_peft_model_state_dict

    both = ["train.max_steps=2", "text_encoder.train=lora"]
    plain = train_in_process(tmp_path, tiny_pipeline_dir, *both, name="plain")
    checkpointed = train_in_process(
        tmp_path, tiny_pipeline_dir, *both, "train.gradient_checkpointing=true", name="ckpt"
    )
    for module in ("unet", "text_encoder"):
        a = get_peft_model_state_dict(getattr(plain.components, module))
        b = get_peft_model_state_dict(getattr(checkpointed.components, module))
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6)


def test_a_fully_masked_out_image_teaches_nothing(tmp_path, tiny_pipeline_dir):
    """Black loss masks: zero loss, so LoRA's B stays zero; white masks: it learns."""
    from PIL import Image

    photos = make_photos(tmp_path / "photos")
    for value, name in ((0, "black"), (255, "white")):
        for photo in photos.glob("photo_*[0-9].png"):
            Image.new("L", Image.open(photo).size, value).save(photo.with_name(photo.stem + ".mask.png"))
        run = train_in_process(tmp_path, tiny_pipeline_dir, "train.weight_decay=0", name=name)
        b = [p for n, p in run.components.unet.named_parameters() if "lora_B" in n]
        assert (run.metrics["train_loss"]["last"] == 0) == (value == 0)
        assert all(p.eq(0).all() for p in b) == (value == 0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 autocast exists on GPUs")
def test_fp16_on_cpu_is_refused_by_name(tmp_path, tiny_pipeline_dir):
    from tuner.errors import ConfigError

    with pytest.raises(ConfigError, match="train.mixed_precision=fp16"):
        train_in_process(tmp_path, tiny_pipeline_dir, "train.mixed_precision=fp16")


LOAD_CASES = {
    "loha": CASES["loha"],
    "pivotal_tuning": CASES["pivotal_tuning"],
    # the embeddings are in diffusers/, the LoHa in peft/: a run folder loads both
    "loha_with_new_token": ["adapter=loha", *CASES["pivotal_tuning"]],
}


@pytest.mark.e2e
@pytest.mark.parametrize("case", list(LOAD_CASES))
def test_load_adapter_brings_back_the_trained_model(tmp_path, tiny_pipeline_dir, case):
    """checkpoint=RUN (as recipe=evaluate uses it) reproduces the run's own samples."""
    trained = train_in_process(tmp_path, tiny_pipeline_dir, *LOAD_CASES[case])
    expected = image_of(trained, trained.cfg.data.instance_prompt)
    loaded = train_in_process(
        tmp_path,
        tiny_pipeline_dir,
        *LOAD_CASES[case],
        f"checkpoint={trained.dir}",  # a run folder: its diffusers/ export, else peft/
        stages="[base,load_adapter]",
        name="loaded",
    )
    got = image_of(loaded, trained.cfg.data.instance_prompt)
    assert np.abs(got - expected).max() < 1e-5


def test_trigger_word_goes_to_instance_captions_only(tmp_path, tiny_pipeline_dir):
    from tuner.data.prepare import load_prepared

    run = train_in_process(
        tmp_path,
        tiny_pipeline_dir,
        "data.instance_prompt=a photo of a ball",
        "data.class_prompt=a photo of a ball",
        "data.trigger=sks",
        "data.trigger_policy=prefix",
        "prior.enabled=true",
        "prior.num_class_images=2",
        "sample.steps=2",
        "train.max_steps=1",
        stages="[base,prepare,class_images,train]",
    )
    assert set(load_prepared(run.dir / "data" / "instance")["caption"]) == {"sks, a photo of a ball"}
    assert set(load_prepared(run.dir / "data" / "class")["caption"]) == {"a photo of a ball"}
