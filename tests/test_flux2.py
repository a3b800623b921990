"""Flux.2 dev and klein against diffusers' own pipelines, on tiny pipelines of their real classes: what the
conformance suite does not check. Prompts encode as ``encode_prompt``, training latents are the pipelines'
normalised patches, ``predict`` is the pipelines' transformer call, ``decode`` their decode; the kohya file
(BFL's names) loads through ``Flux2Pipeline.load_lora_weights`` as the diffusers file does, the single file
through ``Flux2Transformer2DModel.from_single_file``; a step-distilled klein is refused as a training base and
samples without CFG."""

import pytest
import torch

from tests.helpers import PROMPT, train_in_process
from tuner.config import ModelConfig
from tuner.models import register, unregister
from tuner.models.flux2 import Flux2, Flux2Klein

CLASSES = {cls.NAME: cls for cls in (Flux2, Flux2Klein)}  # this module tests these two (by name below)
DEV, KLEIN = Flux2.NAME, Flux2Klein.NAME
LENGTH = 64  # the tiny tokenizers' system message and prompt fit in 64 tokens


@pytest.fixture(scope="module", autouse=True)
def _registered():
    """The families by name for the runs below, whether or not the registry lists them yet."""
    for cls in CLASSES.values():
        register(cls)
    yield
    for name in CLASSES:
        unregister(name)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """``folder(name, size)``: the family's tiny pipeline, saved with save_pretrained (once per module)."""
    made = {}

    def get(name: str, size: str = "test"):
        if (name, size) not in made:
            family = CLASSES[name]()
            pipe = family.pipeline_class()(**family.build_tiny(0, size))
            made[name, size] = tmp_path_factory.mktemp(f"{name}-{size}")
            pipe.save_pretrained(made[name, size], safe_serialization=True)
        return made[name, size]

    return get


def loaded(name, folder, **model):
    family = CLASSES[name](ModelConfig(max_sequence_length=LENGTH, **model))
    pipe = family.load_pipeline(folder)
    pipe.set_progress_bar_config(disable=True)
    return family, family.load(folder), pipe


@pytest.mark.parametrize("name", CLASSES)
def test_prompts_encode_as_the_pipelines_encode_prompt(folder, name):
    family, c, pipe = loaded(name, folder(name))
    prompts = [PROMPT, "A Dog; 3 birds!"]
    ids = family.tokenize(c, prompts)
    assert ids["text_encoder"].shape == (2, LENGTH)
    assert (ids["text_encoder_mask"].sum(1) < LENGTH).all()  # the whole prompt fits, padded
    ours = family.encode_ids(c.text_encoders, ids)["prompt_embeds"]
    theirs, text_ids = pipe.encode_prompt(prompts, device="cpu", max_sequence_length=LENGTH)
    assert ours.shape == theirs.shape == (2, LENGTH, 3 * c.text_encoder.config.get_text_config().hidden_size)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    assert (ours[0] - ours[1]).abs().max() > 1e-3  # the prompt matters


@pytest.mark.parametrize("name", CLASSES)
def test_training_latents_are_the_pipelines_normalised_patches(folder, name):
    family, c, pipe = loaded(name, folder(name))
    image = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        mean, std = family.encode_images(c.vae, image)
        scale, shift = family.latent_normalization(c.vae)
        theirs = pipe._encode_vae_image(image, generator=None)  # the posterior's mode (its mean), normalised
    assert mean.shape == std.shape == theirs.shape == (2, 128, 2, 2)
    torch.testing.assert_close((mean - shift) * scale, theirs, rtol=0, atol=1e-5)


def _one_call(pipe, **call):
    """The transformer's keyword arguments and output on the first step of the pipeline drawing PROMPT."""
    seen = {}

    def hook(module, args, kwargs, output):
        seen.setdefault("kwargs", kwargs)
        seen.setdefault("output", output[0])

    handle = pipe.transformer.register_forward_hook(hook, with_kwargs=True)
    try:
        pipe(prompt=PROMPT, height=32, width=32, num_inference_steps=2, max_sequence_length=LENGTH, **call)
    finally:
        handle.remove()
    return seen["kwargs"], seen["output"]


@pytest.mark.parametrize("name", CLASSES)
def test_predict_is_the_pipelines_transformer_call(folder, name):
    """The packed sequence the pipeline feeds, put back in place by the pipeline's own unpacking, through
    ``predict``: the pipeline's output (dev: at the guidance it samples with, as model.guidance)."""
    family, c, pipe = loaded(name, folder(name), guidance=3.5)
    kwargs, output = _one_call(pipe, guidance_scale=3.5, generator=torch.Generator().manual_seed(0))
    noisy = pipe._unpack_latents_with_ids(kwargs["hidden_states"], kwargs["img_ids"])  # (B, 128, h/2, w/2)
    cond = {"prompt_embeds": kwargs["encoder_hidden_states"]}
    with torch.no_grad():
        ours = family.predict(c.denoiser, noisy, kwargs["timestep"] * 1000, cond)
    torch.testing.assert_close(pipe._pack_latents(ours), output, rtol=0, atol=1e-5)
    assert (kwargs["guidance"] is not None) == (name == DEV)


@pytest.mark.parametrize("name", CLASSES)
def test_decode_is_the_pipelines_decode(folder, name):
    family, _, pipe = loaded(name, folder(name))
    call = dict(prompt=PROMPT, height=32, width=32, num_inference_steps=2, max_sequence_length=LENGTH)
    latents = pipe(**call, generator=torch.Generator().manual_seed(0), output_type="latent").images
    images = pipe(**call, generator=torch.Generator().manual_seed(0), output_type="pt").images
    with torch.no_grad():
        ours = family.decode(pipe, latents, 32, 32)
    torch.testing.assert_close((ours / 2 + 0.5).clamp(0, 1), images, rtol=0, atol=1e-5)


@pytest.mark.e2e
def test_the_kohya_file_loads_in_diffusers_as_the_diffusers_file(tmp_path, folder):
    """BFL's names (q, k, v fused into img_attn.qkv), which diffusers' Flux.2 kohya converter splits back: the same
    image as the diffusers file, every key read."""
    from safetensors import safe_open

    from tuner.export.tensors import tuner_layers

    base = folder(DEV)
    run = train_in_process(
        tmp_path, base, f"model={DEV}", "data.resolution=32", f"model.max_sequence_length={LENGTH}",
        "train.learning_rate=5e-2", "adapter.targets=attn_ff", "export.formats=[diffusers,kohya]",
    )  # fmt: skip
    kohya = run.dir / "kohya" / f"{run.dir.name}.safetensors"
    with safe_open(kohya, "pt") as f:
        modules = {k.split(".")[0] for k in f.keys()}
    assert {"lora_unet_double_blocks_0_img_attn_qkv", "lora_unet_single_blocks_0_linear1"} <= modules
    draws = []
    for file in (run.dir / "diffusers" / "pytorch_lora_weights.safetensors", kohya):
        _, _, pipe = loaded(DEV, base)
        pipe.load_lora_weights(file.parent, weight_name=file.name)
        assert tuner_layers(pipe.transformer)
        draws.append(_one_call(pipe, generator=torch.Generator().manual_seed(0))[1])
    torch.testing.assert_close(draws[1], draws[0], rtol=0, atol=1e-5)
    _, _, plain = loaded(DEV, base)
    assert (_one_call(plain, generator=torch.Generator().manual_seed(0))[1] - draws[0]).abs().max() > 1e-4


@pytest.mark.e2e
@pytest.mark.parametrize("name", CLASSES)
def test_the_single_file_is_bfl_layout_that_from_single_file_reads_back(tmp_path, folder, name):
    from diffusers import Flux2Transformer2DModel
    from safetensors.torch import save_file

    family, c, _ = loaded(name, folder(name))
    state = family.single_file_state(c.modules(), {})
    assert {"double_blocks.0.img_attn.qkv.weight", "single_blocks.0.linear1.weight", "img_in.weight",
            "single_stream_modulation.lin.weight", "final_layer.adaLN_modulation.1.weight"} <= set(state)  # fmt: skip
    save_file(state, tmp_path / "model.safetensors")
    back = Flux2Transformer2DModel.from_single_file(
        str(tmp_path / "model.safetensors"), config=str(folder(name)), subfolder="transformer", local_files_only=True
    )
    ours = c.denoiser.state_dict()
    assert back.state_dict().keys() == ours.keys()
    for key, value in back.state_dict().items():
        torch.testing.assert_close(value, ours[key], rtol=0, atol=0, msg=key)


def test_a_distilled_klein_is_refused_as_a_training_base_and_samples_without_cfg(tmp_path, folder):
    """Train on klein's base checkpoint, draw with the LoRA on the distilled one: a run that trains on a folder
    whose model_index.json says is_distilled is refused before loading, with that advice; generating is not."""
    from tuner.checks import validate
    from tuner.compose import compose
    from tuner.errors import ConfigError

    distilled = folder(KLEIN, "distilled")
    (tmp_path / "photos").mkdir()
    data = [f"data.instance_dir={tmp_path / 'photos'}", "data.instance_prompt=x", f"output_dir={tmp_path / 'out'}"]
    with pytest.raises(ConfigError, match="model.path=.*step-distilled.*base checkpoint"):
        validate(compose("lora", [f"model={KLEIN}", f"model.path={distilled}", *data]))
    validate(compose("generate", [f"model={KLEIN}", f"model.path={distilled}", "generate.prompts=[x]"]))
    validate(compose("lora", [f"model={KLEIN}", f"model.path={folder(KLEIN)}", *data]))
    calls = {}
    for kind in ("test", "distilled"):
        _, _, pipe = loaded(KLEIN, folder(KLEIN, kind))
        count = []
        pipe.transformer.register_forward_hook(lambda *a, count=count: count.append(1))
        pipe(prompt=PROMPT, height=32, width=32, num_inference_steps=2, guidance_scale=4.0, max_sequence_length=LENGTH)
        calls[kind] = len(count)
    assert calls == {"test": 4, "distilled": 2}  # CFG: two transformer calls a step on the base, one distilled


def test_a_folder_naming_pixtrals_processor_loads_without_torchvision(tmp_path, folder):
    """FLUX.2-dev's folder names a PixtralProcessor (torchvision for its image half): tuner reads its tokenizer and
    the processor's chat template (chat_template.json), and encodes prompts as the tokenizer saved alone does."""
    import importlib.util
    import json
    import shutil

    if importlib.util.find_spec("torchvision") is not None:
        pytest.skip("torchvision is installed: the folder's PixtralProcessor itself loads")
    copy = shutil.copytree(folder(DEV), tmp_path / "dev")
    index = json.loads((copy / "model_index.json").read_text())
    (copy / "model_index.json").write_text(json.dumps({**index, "tokenizer": ["transformers", "PixtralProcessor"]}))
    template = (copy / "tokenizer" / "chat_template.jinja").read_text()
    (copy / "tokenizer" / "chat_template.jinja").unlink()
    (copy / "tokenizer" / "chat_template.json").write_text(json.dumps({"chat_template": template}))
    family, c, pipe = loaded(DEV, copy)
    _, original, _ = loaded(DEV, folder(DEV))
    ours = family.encode_prompts(c, [PROMPT])["prompt_embeds"]
    torch.testing.assert_close(ours, family.encode_prompts(original, [PROMPT])["prompt_embeds"], rtol=0, atol=0)
    torch.testing.assert_close(pipe.encode_prompt([PROMPT], device="cpu", max_sequence_length=LENGTH)[0], ours)
