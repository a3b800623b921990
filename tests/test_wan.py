"""What Wan alone does, against WanPipeline on a tiny pipeline of its real classes: prompts as
``_get_t5_prompt_embeds`` encodes them (cleaned, UMT5's states zero past each prompt), an image drawn as frame 0
of the pipeline's one-frame clip at the same seed, the training schedule at the folder's flow shift; its native
names are the ones diffusers' single-file converter maps back, and the kohya file patches ComfyUI's model (native
names) to the merged transformer. What every family does is in tests/test_conformance.py."""

import pytest
import torch

from tests.helpers import patched_as_comfyui, tiny_family, train_in_process
from tuner.models.wan import Wan, native_name

NAME = Wan.NAME
LENGTH = 32  # the tiny pipeline's model.max_sequence_length (TINY_OPTIONS)


@pytest.fixture(scope="module")
def wan(tmp_path_factory):
    """(the family at the tiny options, its components loaded as a user's folder, the folder's pipeline, folder)."""
    return tiny_family(tmp_path_factory, NAME, "Wan2.1-T2V", max_sequence_length=LENGTH)


def test_prompts_are_encoded_as_the_pipeline_encodes_them(wan):
    """Cleaned as the pipeline cleans them (HTML entities, spaces), UMT5's last states, zero past each prompt."""
    family, c, pipe, _ = wan
    prompts = ["a cat", "  a photo &amp; a   dog ", "", "a very long prompt " * 10]
    ours = family.encode_prompts(c, prompts)["prompt_embeds"]
    theirs = pipe._get_t5_prompt_embeds(prompts, max_sequence_length=LENGTH, device=torch.device("cpu"))
    assert ours.shape == theirs.shape == (4, LENGTH, 32)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    n = len(c.tokenizer("a cat").input_ids)  # its tokens and </s>: the states there, zeros after
    assert not ours[0, n:].any() and ours[0, :n].abs().sum(-1).gt(0).all()


def test_an_image_is_frame_0_of_the_pipelines_one_frame_clip_at_the_same_seed(wan):
    """tuner's sampling (the base's own UniPC on flow sigmas, the pipeline's CFG, num_frames=1) draws what
    ``WanPipeline(...)`` draws, with and without a negative prompt; guidance and the negative prompt are read."""
    from tuner.models import samplers
    from tuner.sampling import sample_images

    family, c, pipe, _ = wan
    assert samplers.default(family, c).describe() == "flow_unipc (UniPCMultistepScheduler), the base's own scheduler"
    ours = family.pipeline(c)

    def draw(guidance, negative=None):
        return sample_images(ours, ["a cat"], [0], 32, 3, guidance, negative_prompts=negative, decode=family.decode,
                             guidance=family.guidance_kwargs, **family.call_kwargs())  # fmt: skip

    for guidance, negative in ((3.0, None), (5.0, ["blurry"])):
        theirs = pipe("a cat", negative_prompt=negative, height=32, width=32, num_frames=1, num_inference_steps=3,
                      guidance_scale=guidance, max_sequence_length=LENGTH, generator=torch.Generator().manual_seed(0),
                      output_type="pt").frames  # fmt: skip
        assert theirs.shape == (1, 1, 3, 32, 32)
        torch.testing.assert_close(draw(guidance, negative) / 2 + 0.5, theirs[:, 0], rtol=0, atol=1e-5)
    assert (draw(1.0) - draw(3.0)).abs().max() > 1e-3 and (draw(3.0, ["blurry"]) - draw(3.0)).abs().max() > 1e-3


def test_training_noises_on_the_schedule_the_folder_samples_with(wan):
    """Sigmas shifted by the folder's flow_shift (3), as its UniPC's flow sigmas are; model.timestep_shift wins; the
    transformer is called on (B, C, 1, h, w) and reads the noisy latents and the time."""
    from tuner.config import ModelConfig

    family, c, pipe, _ = wan
    objective = family.objective(c)
    plain = torch.tensor([0.25, 0.5, 0.75])
    steps = (plain * 1000).long()  # sigmas run from 1 at step 0 to 1/1000 at step 999
    sigma = 1 - steps / 1000
    torch.testing.assert_close(objective.sigmas[steps], 3 * sigma / (1 + 2 * sigma))
    assert objective.timesteps[0] == 1000
    other = Wan(ModelConfig(max_sequence_length=LENGTH, timestep_shift=5.0)).objective(c)
    torch.testing.assert_close(other.sigmas[steps], 5 * sigma / (1 + 4 * sigma))
    cond = family.encode_prompts(c, ["a cat", "a dog"])
    noisy = torch.randn(2, 16, 4, 4)
    with torch.no_grad():
        out = family.predict(c.denoiser, noisy, torch.tensor([900.0, 100.0]), cond)
        clip = family.predict(c.denoiser, noisy.unsqueeze(2), torch.tensor([900.0, 100.0]), cond)
        later = family.predict(c.denoiser, noisy, torch.tensor([100.0, 100.0]), cond)
    assert out.shape == noisy.shape and clip.shape == (2, 16, 1, 4, 4)
    torch.testing.assert_close(clip[:, :, 0], out)
    assert (later[0] - out[0]).abs().max() > 1e-4 and torch.equal(later[1], out[1])


def test_native_names_are_the_ones_diffusers_single_file_converter_reads():
    """Every parameter of the transformer under its native name (the original WanModel's, ComfyUI's) maps back to
    diffusers' name through ``convert_wan_transformer_to_diffusers``; the modules a LoRA reaches by their names."""
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    state = Wan().build_tiny()["transformer"].state_dict()
    native = {native_name(k): v for k, v in state.items()}
    assert {"blocks.0.self_attn.q.weight", "blocks.1.cross_attn.o.bias", "blocks.0.ffn.0.weight", "head.modulation",
            "blocks.0.modulation", "blocks.0.norm3.weight", "head.head.weight", "time_projection.1.weight",
            "text_embedding.2.weight", "blocks.0.self_attn.norm_q.weight"} <= set(native)  # fmt: skip
    back = convert_wan_transformer_to_diffusers(dict(native))
    assert back.keys() == state.keys()
    assert all(back[k] is v for k, v in state.items())
    assert native_name("blocks.3.attn2.to_out.0") == "blocks.3.cross_attn.o"
    assert native_name("blocks.3.ffn.net.0.proj") == "blocks.3.ffn.0"


def test_a_wan_22_folder_is_refused_by_name(tmp_path, wan):
    """A14B's two experts (boundary_ratio, transformer_2) and TI2V's per-token time are not Wan 2.1's pipeline."""
    import json
    import shutil

    from tuner.errors import ConfigError

    family, c, pipe, base = wan
    for change, said in (({"boundary_ratio": 0.875}, "A14B"), ({"expand_timesteps": True}, "TI2V 5B")):
        folder = shutil.copytree(base, tmp_path / said.replace(" ", "_"))
        index = json.loads((folder / "model_index.json").read_text())
        (folder / "model_index.json").write_text(json.dumps(index | change))
        with pytest.raises(ConfigError, match=f"is Wan 2.2 {said}"):
            family.check_folder(folder)
    assert family.check_folder(base) == base


@pytest.mark.e2e
def test_the_kohya_file_patches_comfyuis_model_and_diffusers_reads_it_as_the_diffusers_file(tmp_path, wan):
    """ComfyUI reads ``lora_unet_<native module, dots as _>`` onto ``diffusion_model.<native module>.weight``: each
    module of tuner's kohya file is one of the native single file's, and patching it there as ComfyUI does, then
    reading the file back with diffusers' converter, gives the merged folder's transformer. diffusers'
    ``WanPipeline.load_lora_weights`` reads that file (musubi-tuner's layout: every block's attention and FFN) to the
    diffusers file's image."""
    import numpy as np
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    from tests.test_conformance import draw
    from tuner.models.base import Family

    family, c, pipe, base = wan
    run = train_in_process(
        tmp_path, base, f"model={NAME}", "data.resolution=32", f"model.max_sequence_length={LENGTH}",
        "train.learning_rate=5e-2", "adapter.targets=attn_ff", "export.formats=[diffusers,kohya,merged]",
    )  # fmt: skip
    kohya = run.dir / "kohya" / f"{run.dir.name}.safetensors"
    state, modules = patched_as_comfyui(family, c, kohya)
    assert {"lora_unet_blocks_0_self_attn_q", "lora_unet_blocks_1_cross_attn_o", "lora_unet_blocks_0_ffn_2"} <= modules
    back = convert_wan_transformer_to_diffusers(dict(state))
    merged = Family.load(family, run.dir / "merged").denoiser.state_dict()
    assert back.keys() == merged.keys()
    for key, value in merged.items():
        torch.testing.assert_close(back[key], value, rtol=0, atol=1e-5, msg=key)
    assert any((merged[k] - v).abs().max() > 1e-4 for k, v in c.denoiser.state_dict().items())  # it trained

    images = []
    for folder, name in ((kohya.parent, kohya.name), (run.dir / "diffusers", "pytorch_lora_weights.safetensors")):
        reloaded = family.load_pipeline(base)
        reloaded.set_progress_bar_config(disable=True)
        reloaded.load_lora_weights(folder, weight_name=name)
        images.append(draw(family, reloaded))
    np.testing.assert_allclose(images[0], images[1], atol=1e-4)
    assert np.abs(images[1] - draw(family, pipe)).max() > 1e-3  # the adapter changes the image
