"""What Qwen-Image alone does, against its diffusers pipeline: prompts as ``encode_prompt`` encodes them (the chat
template's system prefix dropped, a fixed length with a mask), the transformer called as the pipeline calls it,
the one-frame VAE's per-channel latents, true CFG only with a negative prompt, distilled checkpoints. What every
family does is in tests/test_conformance.py."""

import pytest
import torch

from tests.helpers import tiny_family
from tuner.models.qwen_image import DISTILLED, QwenImage

NAME = QwenImage.NAME
LENGTH = 32  # the tiny pipeline's model.max_sequence_length (TINY_OPTIONS)


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    """(the family at the tiny options, its components loaded as a user's folder, the folder's own pipeline)."""
    return tiny_family(tmp_path_factory, NAME, "pipe", max_sequence_length=LENGTH)[:3]


def test_the_tiny_tokenizer_reads_the_templates_prefix_as_the_tokens_the_pipeline_drops(qwen):
    family, c, pipe = qwen
    prefix = pipe.prompt_template_encode.split("{}")[0]
    assert len(c.tokenizer(prefix).input_ids) == pipe.prompt_template_encode_start_idx == 34
    assert type(c.tokenizer).__name__ == "Qwen2Tokenizer"


def test_prompts_are_encoded_as_the_pipeline_encodes_them_with_the_prefix_dropped(qwen):
    family, c, pipe = qwen
    prompts = ["a cat", "a dog, 35mm", ""]
    ours = family.encode_prompts(c, prompts)
    embeds, mask = pipe.encode_prompt(prompts, device=torch.device("cpu"), max_sequence_length=LENGTH)
    n = embeds.shape[1]
    assert ours["prompt_embeds"].shape == (3, LENGTH, embeds.shape[2]) and n < LENGTH
    torch.testing.assert_close(ours["prompt_embeds"][:, :n], embeds, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours["prompt_embeds_mask"][:, :n], mask)
    assert not ours["prompt_embeds"][:, n:].any() and not ours["prompt_embeds_mask"][:, n:].any()
    # a prompt past max_sequence_length tokens: the pipeline's first LENGTH of them
    long = ["a very long prompt " * 20]
    embeds, mask = pipe.encode_prompt(long, device=torch.device("cpu"), max_sequence_length=LENGTH)
    torch.testing.assert_close(family.encode_prompts(c, long)["prompt_embeds"], embeds, rtol=1e-5, atol=1e-6)
    assert mask is None  # every one of its tokens is the prompt's


def test_the_transformer_is_called_as_the_pipeline_calls_it(qwen):
    """Packed latents, img_shapes, timesteps / 1000 and the prompt at the pipeline's own length (no padding, no
    mask): the padded and masked prompt tuner holds gives the same prediction."""
    family, c, pipe = qwen
    prompts = ["a cat", "a photo of a dog on a beach"]
    cond = family.encode_prompts(c, prompts)
    embeds, mask = pipe.encode_prompt(prompts, device=torch.device("cpu"), max_sequence_length=LENGTH)
    torch.manual_seed(0)
    noisy, t = torch.randn(2, 16, 4, 6), torch.tensor([900.0, 250.0])
    with torch.no_grad():
        ours = family.predict(c.denoiser, noisy, t, cond)
        theirs = pipe.transformer(
            hidden_states=pipe._pack_latents(noisy, 2, 16, 4, 6),
            timestep=t / 1000,
            encoder_hidden_states=embeds,
            encoder_hidden_states_mask=mask,
            img_shapes=[[(1, 2, 3)]] * 2,
            return_dict=False,
        )[0]
    theirs = pipe._unpack_latents(theirs, 4 * pipe.vae_scale_factor, 6 * pipe.vae_scale_factor, pipe.vae_scale_factor)
    torch.testing.assert_close(ours, theirs[:, :, 0], rtol=1e-4, atol=1e-5)


def test_latents_are_the_image_to_image_pipelines_and_decode_as_the_pipeline_decodes(qwen):
    """A cached latent sampled with a seed is what QwenImageImg2ImgPipeline encodes with that seed (one frame,
    per-channel mean and std); decoding the latents a call returns gives the image the call returns."""
    from diffusers import QwenImageImg2ImgPipeline

    from tuner.training.batches import encode_latent_dist

    family, c, pipe = qwen
    images = torch.rand(2, 3, 32, 48) * 2 - 1
    cache = encode_latent_dist(c.vae, images, family=family)
    ours = cache.sample(torch.arange(2), torch.Generator().manual_seed(3))
    img2img = QwenImageImg2ImgPipeline(**pipe.components)
    theirs = img2img._encode_vae_image(images.unsqueeze(2), torch.Generator().manual_seed(3))
    torch.testing.assert_close(ours, theirs[:, :, 0], rtol=1e-5, atol=1e-5)
    call = {"height": 32, "width": 32, "num_inference_steps": 2, "max_sequence_length": LENGTH}
    latents = pipe("a cat", generator=torch.Generator().manual_seed(0), output_type="latent", **call).images
    image = pipe("a cat", generator=torch.Generator().manual_seed(0), output_type="pt", **call).images
    decoded = family.decode(pipe, latents, 32, 32)
    torch.testing.assert_close((decoded / 2 + 0.5).clamp(0, 1), image, rtol=0, atol=1e-5)


def test_true_cfg_runs_only_with_a_negative_prompt_at_the_samplings_guidance(qwen):
    """Without a negative prompt one pass per step whatever the guidance; with one, guidance is true CFG's scale."""
    from tuner.sampling import sample_images

    family, c, pipe = qwen

    def draw(guidance, negative=None):
        kwargs = family.call_kwargs() | {"guidance": family.guidance_kwargs}
        return sample_images(pipe, ["a cat"], [0], 32, 2, guidance, negative_prompts=negative, decode=family.decode,
                             **kwargs)  # fmt: skip

    plain = draw(3.0)
    torch.testing.assert_close(draw(7.0), plain)
    guided = draw(3.0, [" "])
    assert (guided - plain).abs().max() > 1e-3
    assert (draw(7.0, [" "]) - guided).abs().max() > 1e-3  # the scale is the sampling's guidance


def test_a_distilled_checkpoint_is_refused_as_a_training_base_and_takes_a_lora_trained_on_the_base(tmp_path, qwen):
    """A folder named as distilled, or saved with Lightning's sampler (a fixed shift), is refused before anything
    loads, with the advice to train on the base; the base passes, and a LoRA of the base loads onto the distilled
    transformer whole (same modules), which is how it is run."""
    import json
    import shutil

    from tests.test_toolbox import random_lora
    from tuner.errors import ConfigError
    from tuner.export.tensors import tuner_layers

    family, c, pipe = qwen
    base = tmp_path / "Qwen-Image"
    pipe.save_pretrained(base, safe_serialization=True)
    family.check_trainable(base)
    named = shutil.copytree(base, tmp_path / "Qwen-Image-Lightning-8steps")
    with pytest.raises(ConfigError, match="its folder name") as refused:
        family.check_trainable(named)
    assert DISTILLED in str(refused.value)
    scheduled = shutil.copytree(base, tmp_path / "merged")
    config = scheduled / "scheduler" / "scheduler_config.json"
    lightning = json.loads(config.read_text()) | {"base_shift": 1.0986, "max_shift": 1.0986, "shift_terminal": None}
    config.write_text(json.dumps(lightning))
    with pytest.raises(ConfigError, match="fixed shift"):
        family.check_trainable(scheduled)
    lora = random_lora(base, tmp_path / "lora", rank=2, alpha=2.0, seed=1, family=NAME)
    distilled = family.load_pipeline(named)
    distilled.load_lora_weights(lora.parent, weight_name=lora.name)
    assert len(tuner_layers(distilled.transformer)) == 4 * distilled.transformer.config.num_layers  # q, k, v, out


def test_the_single_file_is_the_transformer_by_its_native_names_and_diffusers_reads_it_back(tmp_path, qwen):
    """Comfy-Org's layout (the diffusers names, which are Qwen-Image's own, no prefix): read back whole by
    ``QwenImageTransformer2DModel.from_single_file``, as the model card says."""
    from diffusers import QwenImageTransformer2DModel
    from safetensors.torch import save_file

    family, c, pipe = qwen
    file = tmp_path / "qwen_image.safetensors"
    save_file(family.single_file_state(c.modules(), {}), file)
    folder = tmp_path / "base"
    pipe.save_pretrained(folder, safe_serialization=True)
    back = QwenImageTransformer2DModel.from_single_file(
        str(file), config=str(folder), subfolder="transformer", local_files_only=True
    ).state_dict()
    ours = c.denoiser.state_dict()
    assert back.keys() == ours.keys() and all(torch.equal(back[k], ours[k]) for k in ours)


def test_image_to_image_draws_at_the_given_images_size(qwen):
    """QwenImageImg2ImgPipeline draws 1024 px unless told the size: tuner's sampling passes the image's."""
    from PIL import Image

    from tuner.sampling import sample_images

    family, c, pipe = qwen
    image = Image.fromarray((torch.rand(32, 48, 3) * 255).byte().numpy())
    img2img = family.img2img(pipe)
    img2img.set_progress_bar_config(disable=True)
    out = sample_images(img2img, ["a cat"], [0], 32, 3, 3.0, decode=family.decode, image=image, strength=0.6,
                        **family.call_kwargs())  # fmt: skip
    assert out.shape == (1, 3, 32, 48) and out.std() > 0.01


def test_a_qwen_image_2_1_folder_is_refused_saying_it_is_another_architecture(tmp_path):
    import json

    from tuner.errors import ConfigError

    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "QwenImage21Pipeline"}))
    with pytest.raises(ConfigError, match=r"Qwen-Image 2.1 \(QwenImage21Pipeline\), another architecture"):
        QwenImage().check_folder(tmp_path)
