"""The conformance suite: what every registered model family must do, run for each one without naming it.

Each test takes ``name`` from the registry (``family_names()``) and asks the family what it is (its kit
members: ``DENOISER``, ``EXPORTS``, ``FORMAT_LIMITS``, ``EMBEDDINGS``, ``TINY_OPTIONS``, ...), so a family added to
the registry is tested here with no test edited (tests/test_kit.py runs the suite with a renamed copy).

    fast tier  a few steps of LoRA on the family's tiny pipeline, every file it exports by default reloaded
               through its own diffusers pipeline to the trained image; its refusals name their keys; its
               files are recognised as its own
    e2e tier   every method x the formats that hold it, reloaded; gradient checkpointing and block offload
               give the same adapter; an exact resume; a single file as the base where the family has one
"""

import json
import logging

import numpy as np
import pytest
import torch
from safetensors import safe_open

from tests.helpers import PROMPT, image_of, reference_call, train_in_process
from tuner.models import family_names, get_family
from tuner.models.base import Family

NAMES = family_names()


def args_of(name: str) -> list[str]:
    """What a run on the family's tiny pipeline needs on the command line."""
    return [f"model={name}", "data.resolution=32", *get_family(name).TINY_OPTIONS]


def te_lora(name: str) -> list[str]:
    """``text_encoder.train=lora`` where the family trains text-encoder LoRAs (Qwen-Image's LLM stays frozen)."""
    return ["text_encoder.train=lora"] if get_family(name).LORA_TEXT_ENCODERS else []


def draw(family, pipe) -> np.ndarray:
    """The gallery's image for PROMPT at seed 0 (3 steps, guidance 3), in [0, 1] (H, W, 3); a family that only
    edits edits a gray control (``reference_call``)."""
    from tuner.sampling import sample_images

    image = sample_images(pipe, [PROMPT], [0], 32, 3, 3.0, decode=family.decode, guidance=family.guidance_kwargs,
                          **family.call_kwargs(), **reference_call(family))[0]  # fmt: skip
    return ((image + 1) / 2).permute(1, 2, 0).numpy()


def pipeline_of(family, folder, base):
    """The family's diffusers pipeline from ``folder``, sampling with the sampler tuner's gallery uses on ``base``."""
    pipe = family.load_pipeline(folder)
    pipe.scheduler = family.sampling_scheduler(family.load(base))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def fuses_kohya_modules(family) -> bool:
    """Whether kohya's format joins modules diffusers keeps apart (q, k, v): diffusers' converter then splits them
    at the real model's widths, which a tiny pipeline does not have."""
    return type(family).kohya_siblings is not Family.kohya_siblings


def reloadable_formats(family) -> list[str]:
    """The family's LoRA formats diffusers' ``load_lora_weights`` reads back on its tiny pipeline."""
    kohya = "kohya" in family.EXPORTS and family.DIFFUSERS_READS_KOHYA and not fuses_kohya_modules(family)
    return ["diffusers", *(["kohya"] if kohya else [])]


# --- fast tier ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_lora_trains_and_every_file_reloads_through_the_familys_pipeline(tmp_path, tiny, name, caplog):
    """A DreamBooth LoRA (denoiser and text encoders): each LoRA file the family writes that diffusers reads
    loads through the family's own pipeline with no key left over and draws the trained model's image."""
    from tuner.export.tensors import tuner_layers

    folder, family = tiny(name), get_family(name)
    formats = reloadable_formats(family)
    run = train_in_process(
        tmp_path, folder, *args_of(name), *te_lora(name), "train.learning_rate=5e-2",
        f"export.formats=[{','.join(formats)}]",
    )  # fmt: skip
    family = run.family  # with the run's model settings
    assert run.family.NAME == name
    expected = image_of(run, PROMPT)
    assert np.abs(draw(family, pipeline_of(family, folder, folder)) - expected).max() > 2e-3  # it learned
    files = [run.dir / "diffusers" / "pytorch_lora_weights.safetensors"]
    files += [run.dir / "kohya" / f"{run.dir.name}.safetensors"] if "kohya" in formats else []
    for file in files:
        with safe_open(file, "pt") as f:
            keys, meta = list(f.keys()), f.metadata() or {}
        modules = {k.rsplit(".lora_", 1)[0] for k in keys}
        if file.parent.name == "diffusers":
            prefixes = {k.split(".")[0] for k in keys}
            assert prefixes == {family.DENOISER, *family.LORA_TEXT_ENCODERS}, prefixes  # every trained part
            if family.TARGETS_EXCLUDE:  # the excluded name at the top of the denoiser trains nowhere
                assert f"{family.DENOISER}.{family.TARGETS_EXCLUDE}" not in modules
        else:  # kohya's names (each part under the family's prefix), and what A1111 and Forge sort the file by
            modules = {k.split(".")[0] for k in keys}
            prefixes = [family.KOHYA_PREFIXES[p] for p in (family.DENOISER, *family.LORA_TEXT_ENCODERS)]
            used = {p for p in prefixes if any(m.startswith(p + "_") for m in modules)}
            assert used == set(prefixes) and all(m.startswith(tuple(p + "_" for p in prefixes)) for m in modules)
            assert meta["ss_v2"] == str(family.KOHYA_V2) and meta["ss_base_model_version"] == family.BASE_VERSION
            assert meta["modelspec.architecture"] == f"{family.MODELSPEC_ARCHITECTURE}/lora"
        pipe = pipeline_of(family, folder, folder)
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            pipe.load_lora_weights(file.parent, weight_name=file.name)
        warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        # diffusers saying the file holds no LoRA for a text encoder the family never trains one in is true (Flux's
        # loader, which ChromaPipeline shares, looks in its T5)
        untrained = tuple(f"prefix='{e}'" for e in family.TEXT_ENCODERS if e not in family.LORA_TEXT_ENCODERS)
        quiet = [w for w in warnings if untrained and w.split(" found with the ")[-1].startswith(untrained)]
        warnings = [w for w in warnings if not (w.startswith("No LoRA keys associated to") and w in quiet)]
        assert not [w for w in warnings if "lora" in w.lower() or "key" in w.lower()], (file, warnings)
        applied = sum(len(tuner_layers(getattr(pipe, c))) for c in (family.DENOISER, *family.TEXT_ENCODERS))
        assert applied == len(modules), file  # no key left unloaded
        np.testing.assert_allclose(draw(family, pipe), expected, atol=1e-3, err_msg=str(file))
        described = _describe(file)
        assert name in described.families, (file, described.families, described.evidence)


def _describe(file):
    from tuner.export.inspection import describe

    return describe(file)


def refusals(family) -> list[tuple[list[str], str]]:
    """(overrides, the key the refusal must name) for each thing the family declares it cannot do."""
    cases = [([f"export.formats=[{f}]"], "export.formats") for f in ("kohya", "single_file") if f not in family.EXPORTS]
    for fmt, methods in family.FORMAT_LIMITS.items():
        cases += [([f"adapter={m}", f"export.formats=[{fmt}]"], "export.formats") for m in sorted(methods)]
    if not family.EMBEDDINGS:
        cases.append((["embedding.tokens=[sks]", "adapter=none"], "embedding.tokens"))
    if not family.LORA_TEXT_ENCODERS:
        cases.append((["text_encoder.train=lora"], "text_encoder.train"))
    if not family.SINGLE_FILE_TEXT and "single_file" in family.EXPORTS and family.LORA_TEXT_ENCODERS:
        cases.append((["text_encoder.train=lora", "export.formats=[single_file]"], "export.formats=[single_file]"))
    cases.append(
        ([f"data.resolution={family.RESOLUTION_MULTIPLE * 4 + family.RESOLUTION_MULTIPLE // 2}"], "data.resolution")
    )
    return cases


@pytest.mark.parametrize("name", NAMES)
def test_what_the_family_cannot_do_is_refused_before_loading_naming_the_key(tmp_path, tiny, name):
    from tuner.checks import validate
    from tuner.compose import compose
    from tuner.errors import ConfigError

    family = get_family(name)
    cases = refusals(family)
    assert cases  # at least the resolution its VAE and patches do not divide
    for overrides, key in cases:
        cfg = compose(
            "lora",
            [*args_of(name), f"model.path={tiny(name)}", f"data.instance_dir={tmp_path}", "data.instance_prompt=x",
             f"output_dir={tmp_path / 'out'}", *overrides],
        )  # fmt: skip
        with pytest.raises(ConfigError) as refused:
            validate(cfg)
        assert key in str(refused.value), (overrides, str(refused.value))
        assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", NAMES)
def test_resolution_defaults_to_the_size_the_base_draws(tmp_path, name):
    """The denoiser's sample_size x the VAE's downscale (a denoiser without one: the VAE's own size, in pixels),
    as diffusers' pipelines default to; what the user sets wins."""
    import json

    from tuner.compose import compose
    from tuner.models.tiny import make_tiny_pipeline

    folder, family = make_tiny_pipeline(tmp_path / "pipe", family=name), get_family(name)
    size = json.loads((folder / family.DENOISER / "config.json").read_text()).get("sample_size")
    vae = json.loads((folder / "vae" / "config.json").read_text())
    native = size * 2 ** (len(vae["block_out_channels"]) - 1) if size else vae.get("sample_size")
    # a folder that names no size (Qwen-Image's: its pipeline draws a constant 1024 px): the family's own
    native = native or family.DEFAULT_RESOLUTION
    assert native != family.DEFAULT_RESOLUTION or not (size or vae.get("sample_size"))  # the folder's is read
    cfg = compose("lora", [f"model={name}", f"model.path={folder}"])
    assert cfg.model.resolution == cfg.data.resolution == native
    assert compose("lora", [f"model={name}", f"model.path={folder}", "data.resolution=64"]).data.resolution == 64
    given = compose("lora", [f"model={name}", f"model.path={folder}", "model.resolution=48"])
    assert given.model.resolution == given.data.resolution == 48


@pytest.mark.parametrize("name", NAMES)
def test_partial_training_defaults_and_a_glob_matching_nothing_is_refused_before_loading(tmp_path, name):
    """The family's default globs (PARTIAL_BLOCKS) match its denoiser, checked against the denoiser built from its
    config on the meta device: no weight is read."""
    from tuner.compose import compose
    from tuner.errors import ConfigError
    from tuner.models import checks
    from tuner.models.tiny import make_tiny_pipeline

    folder = make_tiny_pipeline(tmp_path / "pipe", family=name)
    for file in folder.rglob("*.safetensors"):  # not one weight file is needed for the check
        file.unlink()
    given = [f"model={name}", f"model.path={folder}", "adapter=partial_unet"]
    checks._check_blocks(compose("lora", given), get_family(name))  # the family's default matches
    bad = compose("lora", [*given, "adapter.blocks=[{pattern:down_blocks.*.nothing.*}]"])
    with pytest.raises(ConfigError, match=r"adapter.blocks: 'down_blocks.\*.nothing.\*' match no"):
        checks._check_blocks(bad, get_family(name))


# --- e2e tier ----------------------------------------------------------------------------------------------
METHODS = {
    "lora": [],
    "dora": ["adapter.use_dora=true"],
    "loha": ["adapter=loha"],
    "lokr": ["adapter=lokr", "adapter.rank=4"],
    "locon": ["adapter.targets=locon"],  # a U-Net's convolutions too
    "partial": ["adapter=partial_unet"],  # the family's default blocks
    "full": ["adapter=full"],
    "text_encoder_lora": ["text_encoder.train=lora", "adapter=none"],
}


def _method_cases():
    for name in NAMES:
        for method in METHODS:
            if method == "locon" and get_family(name).DENOISER != "unet":
                continue  # a transformer's blocks have no convolutions: locon is all_linear there
            if method == "text_encoder_lora" and not get_family(name).LORA_TEXT_ENCODERS:
                continue  # refused (the refusals above)
            yield pytest.param(name, method, id=f"{name}-{method}")


@pytest.mark.e2e
@pytest.mark.parametrize("name, method", list(_method_cases()))
def test_every_method_exports_and_reloads_to_the_trained_image(tmp_path, tiny, name, method):
    """It trains, exports ``merged``, and the merged pipeline folder, loaded by the family's own diffusers pipeline,
    draws what the trained model drew; the diffusers LoRA file (LoRA, DoRA, text-encoder LoRA) onto the base too."""
    base = tiny(name)
    lora = method in ("lora", "dora", "text_encoder_lora")
    run = train_in_process(
        tmp_path, base, *args_of(name), "train.learning_rate=5e-2", *METHODS[method],
        f"export.formats=[merged{',diffusers' if lora else ''}]",
    )  # fmt: skip
    family = run.family
    expected = image_of(run, PROMPT)
    assert np.abs(draw(family, pipeline_of(family, base, base)) - expected).max() > 2e-3  # it learned something
    np.testing.assert_allclose(draw(family, pipeline_of(family, run.dir / "merged", base)), expected, atol=2e-3)
    if lora:  # diffusers' own LoRA file, onto the base
        pipe = pipeline_of(family, base, base)
        pipe.load_lora_weights(run.dir / "diffusers", weight_name="pytorch_lora_weights.safetensors")
        np.testing.assert_allclose(draw(family, pipe), expected, atol=2e-3)


def _same_adapters(a_run, b_run, rtol, atol):
    from peft.utils import get_peft_model_state_dict

    adapted = [part for part, m in a_run.components.trainable().items() if getattr(m, "peft_config", None)]
    assert a_run.family.DENOISER in adapted
    for part in adapted:
        a = get_peft_model_state_dict(a_run.components.trainable()[part])
        b = get_peft_model_state_dict(b_run.components.trainable()[part])
        assert a and a.keys() == b.keys(), part
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=rtol, atol=atol, msg=f"{part} {key}")
    return adapted


@pytest.mark.e2e
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_gradient_checkpointing_gives_the_same_adapters(tmp_path, tiny, name, quantize):
    """The denoiser's and text encoders' LoRA after 2 steps with and without gradient checkpointing (on an NF4
    base too): the same tensors, to float round-off."""
    both = [*args_of(name), "train.max_steps=2", *te_lora(name),
            *([f"model.quantize={quantize}"] if quantize else [])]  # fmt: skip
    plain = train_in_process(tmp_path, tiny(name), *both, name="plain")
    ckpt = train_in_process(tmp_path, tiny(name), *both, "train.gradient_checkpointing=true", name="ckpt")
    assert len(_same_adapters(plain, ckpt, 1e-5, 1e-6)) > len(te_lora(name))  # the denoiser and a text encoder


@pytest.mark.e2e
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("checkpointing", [False, True])
def test_block_offload_gives_the_same_adapters(tmp_path, tiny, name, checkpointing):
    """Every block of the denoiser offloaded, the encoders parked: the same LoRA after 2 steps.

    With SGD, whose update is linear in the gradient: the device copies compute the same gradients up to float
    rounding (3e-10 here), and Adam's first steps (about lr times the gradient's sign) would turn a rounding-level
    difference in a near-zero gradient into a difference of lr (SDXL's tiny U-Net, 2e-3 on some CPUs)."""
    from tuner.training.offload import blocks_of

    both = [*args_of(name), "train.max_steps=2", "train.optimizer=sgd",
            f"train.gradient_checkpointing={str(checkpointing).lower()}"]  # fmt: skip
    plain = train_in_process(tmp_path, tiny(name), *both, name="plain")
    every = len(blocks_of(plain.components.denoiser, plain.family.OFFLOAD_BLOCKS))
    assert every > 0  # OFFLOAD_BLOCKS names the denoiser's block classes
    offload = [f"train.offload_blocks={every}", "model.offload_frozen=true"]
    off = train_in_process(tmp_path, tiny(name), *both, *offload, name="off")
    assert set(off.metrics["offload_frozen"]["modules"]) == {"vae", *off.components.text_encoders}
    _same_adapters(plain, off, 1e-6, 1e-7)


@pytest.mark.e2e
@pytest.mark.parametrize("name", NAMES)
def test_lora_under_fsdp_on_two_processes_trains_what_one_process_trains(tmp_path, tiny, name):
    """``distributed.strategy=fsdp`` under torchrun, 2 ranks at batch 1 each (gloo on the CPUs): the family's
    denoiser sharded, the LoRA of the same global batch as one process at batch 2 (SGD: fp32 round-off apart),
    exported by rank 0 in diffusers' format."""
    from safetensors.torch import load_file

    from tests.helpers import make_photos, torchrun

    photos = make_photos(tmp_path / "photos", 2)
    args = ["recipe=lora", *args_of(name), f"model.path={tiny(name)}", f"data.instance_dir={photos}",
            f"data.instance_prompt={PROMPT}", "train.optimizer=sgd", "train.learning_rate=5e-2", "train.max_steps=2",
            "validation.every=0", "log.tensorboard=false", "stages=[base,prepare,train,export]",
            "export.formats=[diffusers]"]  # fmt: skip
    two = torchrun([*args, "distributed.strategy=fsdp", "train.batch_size=1", f"output_dir={tmp_path / 'two'}"],
                   tmp_path, "two")  # fmt: skip
    assert two.wait() == 0, two.text[-3000:]
    one = torchrun([*args, "train.batch_size=2", f"output_dir={tmp_path / 'one'}"], tmp_path, "one", nproc=1)
    assert one.wait() == 0, one.text[-3000:]
    lora = "diffusers/pytorch_lora_weights.safetensors"
    sharded, whole = load_file(tmp_path / "two" / lora), load_file(tmp_path / "one" / lora)
    assert sharded.keys() == whole.keys() and any("lora_B" in k for k in whole)
    assert max(v.abs().max().item() for k, v in whole.items() if "lora_B" in k) > 1e-4  # it trained
    for key in whole:
        torch.testing.assert_close(sharded[key], whole[key], rtol=1e-4, atol=1e-6, msg=key)
    assert json.loads((tmp_path / "two" / "summary.json").read_text())["processes"] == 2


@pytest.mark.e2e
@pytest.mark.parametrize("name", NAMES)
def test_resume_from_a_checkpoint_ends_where_the_whole_run_ends(tmp_path, tiny, name):
    """4 steps straight, and 2 steps resumed from the checkpoint at step 2: the same adapter and loss."""
    settings = [*args_of(name), *te_lora(name), "train.max_steps=4", "checkpoints.every=2"]
    whole = train_in_process(tmp_path, tiny(name), *settings, name="whole")
    step = whole.dir / "checkpoints" / "step-0000002"
    resumed = train_in_process(tmp_path, tiny(name), *settings, f"resume={step}", name="resumed")
    _same_adapters(whole, resumed, 0, 0)
    assert resumed.metrics["train_loss"] == whole.metrics["train_loss"]


def _single_file_families():
    for name in NAMES:
        family = get_family(name)
        if "single_file" in family.EXPORTS and family.SINGLE_FILE_TEXT:
            yield name


@pytest.mark.e2e
@pytest.mark.parametrize("name", list(_single_file_families()))
def test_a_single_file_checkpoint_loads_as_the_base_and_draws_the_folders_images(tmp_path, name):
    """The family's original single-file layout (A1111's and ComfyUI's) as model.path, with model.config: the
    same images as the folder, converted once."""
    from safetensors.torch import save_file

    from tuner.checks import validate
    from tuner.compose import compose
    from tuner.models.tiny import make_tiny_pipeline
    from tuner.runner import BUILTINS, entries, run_stage
    from tuner.stages.context import Run

    # the block structure the original layout assumes, where the family's tiny shapes differ from it
    folder, family = make_tiny_pipeline(tmp_path / "pipe", size="layout", family=name), get_family(name)
    c = family.load(folder)
    vocab = {n: m.config.vocab_size for n, m in c.text_encoders.items()}
    file = tmp_path / "model.safetensors"
    save_file(family.single_file_state(c.modules(), vocab), file)  # the layout A1111 and ComfyUI read

    def run_of(*overrides):
        cfg = compose(
            "generate",
            [*args_of(name), f"home={tmp_path / 'home'}", "generate.prompts=[x]", *overrides],
        )
        validate(cfg)
        run = Run(cfg, entries(cfg), BUILTINS)
        run_stage(run, "base")
        return run

    with pytest.raises(Exception, match="model.config"):
        run_of(f"model.path={file}", f"output_dir={tmp_path / 'x'}")
    from_file = run_of(f"model.path={file}", f"model.config={folder}", f"output_dir={tmp_path / 'a'}")
    assert from_file.base.parent == tmp_path / "home" / "single_file"
    from_folder = run_of(f"model.path={folder}", f"output_dir={tmp_path / 'b'}")
    a = from_file.sample([PROMPT], [0], steps=3, guidance=3.0)
    b = from_folder.sample([PROMPT], [0], steps=3, guidance=3.0)
    assert a.std() > 0.01
    torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
    again = run_of(f"model.path={file}", f"model.config={folder}", f"output_dir={tmp_path / 'c'}")
    assert again.base == from_file.base  # converted once


def _denoiser_file_families():
    for name in NAMES:
        family = get_family(name)
        if "single_file" in family.EXPORTS and not family.SINGLE_FILE_TEXT and family.TINY_SINGLE_FILE:
            yield name


@pytest.mark.e2e
@pytest.mark.parametrize("name", list(_denoiser_file_families()))
def test_a_single_file_denoiser_as_its_maker_ships_it_trains_and_exports(tmp_path, tiny, name):
    """The denoiser alone in its original layout (the file users download; the family's single_file export), as
    model.path with model.config (the text encoders and VAE from that folder): converted once by diffusers'
    loader to the folder's own weights, then a LoRA trains on it and exports the family's default formats."""
    from safetensors.torch import save_file

    family, folder = get_family(name), tiny(name)
    c = family.load(folder)
    file = tmp_path / "model.safetensors"
    save_file(family.single_file_state(c.modules(), {}), file)
    formats = f"export.formats=[{','.join([*family.DEFAULT_EXPORTS, 'single_file'])}]"
    run = train_in_process(tmp_path, file, f"model.config={folder}", *args_of(name), "train.max_steps=2",
                           f"home={tmp_path / 'home'}", formats)  # fmt: skip
    assert run.base.parent == tmp_path / "home" / "single_file"
    converted = family.load(run.base).denoiser.state_dict()
    ours = c.denoiser.state_dict()
    assert converted.keys() == ours.keys()
    for key in ours:
        torch.testing.assert_close(converted[key], ours[key], rtol=0, atol=0, msg=key)
    for fmt in family.DEFAULT_EXPORTS:
        files = list((run.dir / fmt).glob("*.safetensors"))
        assert files, f"{fmt}: nothing exported"
        with safe_open(files[0], "pt") as f:
            trained = [f.get_tensor(k) for k in f.keys() if "lora_B" in k or "lora_up" in k]
        assert trained and max(t.abs().max().item() for t in trained) > 0, fmt
    # the trained model's own single file, in the same layout, converts again: the base's keys, the LoRA merged in
    again = family.from_single_file(next((run.dir / "single_file").glob("*.safetensors")), folder, tmp_path / "again")
    merged = family.load(again).denoiser.state_dict()
    assert merged.keys() == ours.keys()
    assert any(not torch.equal(merged[k], ours[k]) for k in ours)


@pytest.mark.e2e
@pytest.mark.parametrize("name", NAMES)
def test_an_nf4_base_trains_only_the_adapters_and_merges_onto_its_own_weights(tmp_path, tiny, name):
    """The denoiser and text encoders in NF4 under LoRA: only the adapters train, and merged/
    holds peft's merge of the exported adapter onto the base's fp32 weights from its folder."""
    import diffusers
    from peft import PeftModel
    from safetensors.torch import load_file

    from tuner.models.quantize import is_quantized

    folder = tiny(name)
    run = train_in_process(
        tmp_path,
        folder,
        *args_of(name),
        "model.quantize=nf4",
        "model.quantize_text_encoders=nf4",
        *te_lora(name),
        f"export.formats=[peft,merged{',kohya' if 'kohya' in get_family(name).EXPORTS else ''}]",
    )
    c, denoiser = run.components, run.family.DENOISER
    assert is_quantized(c.denoiser) and all(is_quantized(m) for m in c.text_encoders.values())
    trained = [n for m in c.modules().values() for n, p in m.named_parameters() if p.requires_grad]
    assert trained and all("lora_" in n for n in trained)
    cls = getattr(diffusers, type(c.denoiser).__name__)
    base = cls.from_pretrained(folder / denoiser).eval()
    expected = PeftModel.from_pretrained(base, run.dir / "peft" / denoiser).merge_and_unload().state_dict()
    merged = load_file(run.dir / "merged" / denoiser / "diffusion_pytorch_model.safetensors")
    assert merged.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(merged[key], value, rtol=0, atol=1e-6, msg=key)


@pytest.mark.e2e
@pytest.mark.parametrize("name", NAMES)
def test_loras_merge_exactly_resize_losslessly_and_are_recognised(tmp_path, tiny, name):
    """On each family's tiny pipeline: two random LoRAs (one through tuner's kohya export, where diffusers reads
    that family's kohya files of a tiny model) merged exactly equal diffusers' set_adapters; resized to full rank
    they draw the same image; inspect names the family (or a set holding it, where a tiny model's widths cannot
    tell)."""
    from tests.test_toolbox import SAMPLE, draw, pipeline, random_lora, run_recipe_here

    family = name
    base = tiny(family)
    size = 32 if get_family(family).RESOLUTION_MULTIPLE >= 16 else 16
    sample = [*SAMPLE[:3], f"data.resolution={size}", f"model={family}"]
    a = random_lora(base, tmp_path / "a", rank=4, alpha=2.0, seed=1, family=family)
    b = random_lora(base, tmp_path / "b", rank=3, alpha=6.0, seed=2, family=family)
    # diffusers reads no kohya file of some families, and splits modules kohya's format fuses at the real model's
    # widths, not a tiny model's (ComfyUI reads both: the clients tier)
    kohya_reads = "kohya" in reloadable_formats(get_family(family))
    if kohya_reads:
        run_recipe_here(
            "export",
            f"model={family}",
            f"model.path={base}",
            f"checkpoint={a}",
            "export.formats=[kohya]",
            "export.name=a",
            f"output_dir={tmp_path / 'ak'}",
        )
        a = tmp_path / "ak" / "kohya" / "a.safetensors"
    formats = "[diffusers,kohya]" if kohya_reads else "[diffusers]"
    run_recipe_here(
        "lora_merge", f"model.path={base}", f"merge.inputs=[{{path: {a}, weight: 1.0}}, {{path: {b}, weight: 0.5}}]",
        f"export.formats={formats}", "export.name=ab", f"output_dir={tmp_path / 'm'}", *sample,
    )  # fmt: skip
    reference = draw(pipeline(base, [(a, 1.0), (b, 0.5)], family), size)
    assert (reference - draw(pipeline(base, [], family), size)).abs().max() > 1e-3
    merged = [tmp_path / "m" / "diffusers" / "pytorch_lora_weights.safetensors"]
    merged += [tmp_path / "m" / "kohya" / "ab.safetensors"] if kohya_reads else []
    for path in merged:
        torch.testing.assert_close(draw(pipeline(base, [(path, 1.0)], family), size), reference, atol=1e-4, rtol=0)
    run_recipe_here(
        "lora_resize",
        f"model.path={base}",
        f"checkpoint={merged[0]}",
        "resize.rank=7",
        "export.formats=[diffusers]",
        f"output_dir={tmp_path / 'r'}",
        *sample,
    )
    resized = tmp_path / "r" / "diffusers" / "pytorch_lora_weights.safetensors"
    torch.testing.assert_close(draw(pipeline(base, [(resized, 1.0)], family), size), reference, atol=1e-4, rtol=0)
    for path in merged:
        run_recipe_here(
            "inspect",
            f"checkpoint={path}",
            f"model.path={base}",
            f"output_dir={tmp_path / ('i' + path.parent.name)}",
            *sample,
        )
        report = json.loads((tmp_path / ("i" + path.parent.name) / "inspect.json").read_text())
        assert family in report["families"], report["family_evidence"]
        assert report["not_loading"]["landed"] == report["not_loading"]["modules"]
