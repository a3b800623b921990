"""Every shipped recipe composes and validates; bad keys fail at compose time, naming the key."""

import pytest
from omegaconf import OmegaConf

from tuner.__main__ import main
from tuner.checks import validate
from tuner.compose import compose, list_recipes
from tuner.errors import ConfigError
from tuner.models import family_names, get_family

NEEDS = {
    "dreambooth_lora": ["data.instance_prompt=a photo of sks dog", "data.class_prompt=a photo of a dog"],
    "evaluate": ["checkpoint=tests"],
    "lora": ["sample.prompts=[a watercolour of a harbour]"],
    "dreambooth_partial_unet": ["data.instance_prompt=a photo of sks dog", "data.class_prompt=a photo of a dog"],
    "generate": ["generate.prompts=[a photo of a dog]"],
    # (the recipe on a tiny edit family: tests/test_edit_outputs.py)
    "edit_lora": ["model=sd15", "data.instance_prompt=make it a watercolour", "data.bucket_step=8"],
}
TOOLBOX = {
    "lora_merge": lambda lora, base: [f"merge.inputs=[{{path: {lora}}}]"],
    "lora_resize": lambda lora, base: [f"checkpoint={lora}", "resize.rank=1"],
    "lora_extract": lambda lora, base: [f"extract.tuned={base}"],
    "inspect": lambda lora, base: [f"checkpoint={lora}"],
}
USER_MODEL = (
    "dreambooth_lora",
    "lora",
    "dreambooth_partial_unet",
    "textual_inversion",
    "export",
    "generate",
    "edit_lora",
)


@pytest.mark.parametrize("recipe", sorted(list_recipes()))
def test_every_recipe_composes_and_validates(recipe, tmp_path, tiny_pipeline_dir):
    overrides = NEEDS.get(recipe, [])
    if recipe in USER_MODEL:
        overrides = overrides + [f"model.path={tiny_pipeline_dir}", "data.resolution=16"]
    if recipe in USER_MODEL + ("prepare", "evaluate"):
        overrides = overrides + [f"data.instance_dir={tmp_path}"]
    if recipe in TOOLBOX:  # a LoRA file's header is read while the config is checked
        import torch
        from safetensors.torch import save_file

        lora = tmp_path / "lora.safetensors"
        name = "lora_unet_down_blocks_0_attentions_0_proj_in"
        down, up = torch.zeros(2, 16, 1, 1), torch.zeros(16, 2, 1, 1)  # the tiny U-Net's 1x1 proj_in, 16 wide
        save_file({f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up}, lora)
        overrides = [f"model.path={tiny_pipeline_dir}", *TOOLBOX[recipe](lora, tiny_pipeline_dir)]
    cfg = compose(recipe, overrides)
    validate(cfg)
    assert cfg.recipe == recipe and cfg.stages
    OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves


def test_no_recipe_lists_every_recipe(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    for name in list_recipes():
        assert name in out


def test_unknown_key_is_named_with_a_suggestion(capsys):
    assert main(["recipe=quickstart", "train.max_stepz=3"]) == 2
    err = capsys.readouterr().err
    assert "train.max_stepz" in err and "train.max_steps" in err


def test_wrong_type_is_named(capsys):
    assert main(["recipe=quickstart", "train.max_steps=many"]) == 2
    assert "train.max_steps" in capsys.readouterr().err


def test_a_value_written_as_a_section_names_the_section_meant(capsys):
    assert main(["recipe=lora", "checkpoint.every=10"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "tuner: config error: checkpoint.every: checkpoint is a single value, not a section with keys. "
        "Did you mean checkpoints.every or checkpoints.keep or checkpoints.select?"
    )


def test_a_section_written_as_a_value_names_its_keys(capsys):
    assert main(["recipe=lora", "train=5"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("tuner: config error: train is a section, not a value: set its keys, e.g. train.")
    assert "Traceback" not in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("value", ["a photo of <sks> dog", "a [photo"])
def test_a_value_hydra_cannot_parse_is_shown_quoted(capsys, value):
    """A token like <sks> must be quoted for Hydra: the message shows the override that works."""
    assert main(["recipe=lora", "train.max_steps=3", f"data.instance_prompt={value}", "print_config"]) == 2
    err = capsys.readouterr().err.strip()
    assert f"quote it, data.instance_prompt='{value}'" in err and len(err.splitlines()) == 1
    assert main(["recipe=lora", f"data.instance_prompt='{value}'", "print_config"]) == 0  # as it says
    assert f"instance_prompt: {value}" in capsys.readouterr().out


def test_unknown_recipe(capsys):
    assert main(["recipe=nope"]) == 2
    assert "quickstart" in capsys.readouterr().err


def test_quickstart_prompts_follow_the_subject_digit():
    cfg = compose("quickstart", ["subject.digit=4"])
    assert cfg.data.class_prompt == "a photo of the digit four"
    assert cfg.data.instance_prompt == "a photo of sks digit four"


def test_dreambooth_lora_asks_for_the_model_folder(tmp_path):
    cfg = compose("dreambooth_lora", NEEDS["dreambooth_lora"] + [f"data.instance_dir={tmp_path}"])
    with pytest.raises(ConfigError, match="model.path is not set"):
        validate(cfg)


def test_prior_preservation_needs_a_class_prompt_and_is_off_without_one(tmp_path):
    given = ["model=digits", f"data.instance_dir={tmp_path}", "data.instance_prompt=a photo of sks dog"]
    cfg = compose("dreambooth_lora", given)
    validate(cfg)  # the brief's command: no class prompt, so no prior preservation
    assert cfg.prior.enabled is False
    assert compose("dreambooth_lora", [*given, "data.class_prompt=a photo of a dog"]).prior.enabled is True
    with pytest.raises(ConfigError, match="data.class_prompt"):  # insisting on it without one
        validate(compose("dreambooth_lora", [*given, "prior.enabled=true"]))


def test_missing_instance_dir_is_refused(tmp_path):
    cfg = compose("prepare", [f"data.instance_dir={tmp_path / 'nothing'}"])
    with pytest.raises(ConfigError, match="data.instance_dir"):
        validate(cfg)


def test_model_folder_of_wrong_kind_is_refused(tmp_path):
    (tmp_path / "model_index.json").write_text('{"_class_name": "FluxPipeline"}')
    cfg = compose(
        "dreambooth_lora",
        [
            f"data.instance_dir={tmp_path}",
            "data.instance_prompt=x",
            "data.class_prompt=y",
            "model=sd15",
            f"model.path={tmp_path}",
        ],
    )
    with pytest.raises(ConfigError, match="FluxPipeline"):
        validate(cfg)


@pytest.mark.parametrize(
    "override, key",
    [
        ("subject.transform=spin", "subject.transform"),
        ("base.size=huge", "base.size"),
        ("data.resolution=20", "data.resolution"),
        ("train.lr_scheduler=cosine_restarts", "train.lr_scheduler"),
        ("train.log_every=0", "train.log_every"),
        ("model.prediction_type=flow", "model.prediction_type"),
        ("data.background=[1,2]", "data.background"),
    ],
)
def test_bad_values_are_refused_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=key):
        validate(compose("quickstart", [override]))


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["adapter=lora", "text_encoder.train=full"], "text_encoder.train=full"),
        (["adapter=full", "text_encoder.train=lora"], "text_encoder.train=lora"),
        (["adapter=none"], "nothing to train"),
        (["adapter.targets=everything"], "adapter.targets"),
        (["train.optimizer=lion"], "train.optimizer"),
        (["train.timestep_bias=middle"], "train.timestep_bias"),
        (["embedding.tokens=[a,b]", "embedding.init_words=[dog]"], "embedding.init_words"),
        (["export.formats=[onnx]"], "export.formats"),
        (["adapter=full", "export.formats=[diffusers,kohya]"], "add merged or single_file"),  # adapters only
        (["adapter.use_dora=true", "export.formats=[kohya]"], "dora"),
        (["export.variant=fp8"], "export.variant"),
        (["export.name=../up"], "export.name"),
    ],
)
def test_impossible_training_choices_are_refused_by_name(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate(compose("quickstart", overrides))


def test_the_issue_interface_composes(tmp_path, tiny_pipeline_dir):
    """The command users and scripts rely on: these keys must keep working."""
    cfg = compose(
        "dreambooth_lora",
        [
            f"model.path={tiny_pipeline_dir}",
            f"data.instance_dir={tmp_path}",
            "data.instance_prompt=a photo of sks dog",
            "data.class_prompt=a photo of a dog",
            "prior.enabled=true",
            "prior.num_class_images=100",
            "prior.loss_weight=1.0",
            "adapter=lora",
            "adapter.rank=16",
            "adapter.alpha=16",
            "train.max_steps=800",
            "train.batch_size=4",
            "train.learning_rate=1e-4",
            "seed=0",
            "output_dir=runs/my_dog",
            "data.resolution=16",
        ],
    )
    validate(cfg)
    assert (cfg.prior.num_class_images, cfg.adapter.rank, cfg.train.max_steps, cfg.output_dir) == (
        100,
        16,
        800,
        "runs/my_dog",
    )


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["adapter.init=pissa"], "adapter.init"),
        (["adapter=none", "text_encoder.train=lora", "text_encoder.stop_at=0.5"], "stop_at"),
        (["train.lr_scheduler=one_cycle", "train.warmup_steps=400"], "warmup_steps"),
    ],
)
def test_training_settings_that_cannot_work_are_refused(overrides, match):
    with pytest.raises(ConfigError, match=match):
        validate(compose("quickstart", overrides))


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.optimizer=lion", "train.optimizer=lion: choose one of adamw, adamw8bit, prodigy, sgd"),
        ("export.formats=[diffusers,onnx]", "export.formats[1]=onnx: choose one of diffusers, kohya, peft, merged"),
        ("data.sources=[{path: x, role: klass}]", "data.sources: role=klass: choose one of instance, class"),
        ("model.prediction_type=flow", "model.prediction_type=flow: choose one of epsilon, v_prediction"),
    ],
)
def test_a_value_outside_its_vocabulary_fails_at_compose_naming_the_key_and_the_choices(override, message):
    with pytest.raises(ConfigError) as refused:
        compose("quickstart", [override])
    assert message in str(refused.value)


@pytest.mark.parametrize(
    "stages, message",
    [
        ("[prepare,train]", "train needs base before it; e.g. stages=[base,prepare,train]"),
        ("[base,train]", "train needs prepare before it"),
        ("[base,prepare,gallery]", "gallery needs train or load_adapter before it"),
        ("[base,prepare,trian]", "unknown stage(s) ['trian']"),
    ],
)
def test_stages_out_of_order_are_refused_with_an_order_that_works(tmp_path, stages, message):
    overrides = ["model=digits", f"data.instance_dir={tmp_path}", "data.instance_prompt=x", f"stages={stages}"]
    cfg = compose("lora", overrides)
    with pytest.raises(ConfigError) as refused:
        validate(cfg)
    assert message in str(refused.value)


def test_every_export_format_of_the_vocabulary_has_its_format_object():
    from tuner.choices import ExportFormat
    from tuner.export.formats import FORMATS

    assert list(FORMATS) == [f.value for f in ExportFormat]
    first = get_family(family_names()[0])
    assert all(f.holds and f.loaded_by and f.usage([], "BASE", first, "x") is not None for f in FORMATS.values())


def test_the_config_is_read_only_once_the_run_folder_is_named(tmp_path):
    """Stages read the configuration, never write it; config.yaml records it with the run folder."""
    from accelerate.state import AcceleratorState
    from omegaconf.errors import ReadonlyConfigError

    from tuner.runner import BUILTINS, entries
    from tuner.stages.context import Base, Run

    AcceleratorState._reset_state(True)  # another test's accelerator (its precision) must not carry over
    (tmp_path / "photos").mkdir()
    cfg = compose("prepare", [f"data.instance_dir={tmp_path / 'photos'}", f"output_dir={tmp_path / 'run'}"])
    validate(cfg)
    run = Run(cfg, entries(cfg), BUILTINS)
    with pytest.raises(ReadonlyConfigError):
        run.cfg.data.instance_dir = "elsewhere"
    saved = OmegaConf.load(run.dir / "config.yaml")
    assert saved.output_dir == str(tmp_path / "run") and saved.data.instance_dir == str(tmp_path / "photos")
    with pytest.raises(ConfigError, match="no earlier stage produced a Base"):
        run.result(Base)


@pytest.mark.parametrize(
    "family, overrides, formats",
    [
        ("sd15", [], ["diffusers", "kohya"]),
        ("sdxl", [], ["diffusers", "kohya"]),
        ("flux", [], ["diffusers", "kohya"]),
        ("flux", ["adapter=loha"], ["peft"]),  # kohya's Flux keys fuse q, k, v: a LoHa does not stack
        ("sd15", ["adapter=full"], ["merged"]),  # a full fine-tune: what holds it
        ("sdxl", ["adapter.use_dora=true"], ["diffusers"]),  # kohya's format holds no DoRA
        ("sd15", ["embedding.tokens=[sks]", "adapter=none"], ["diffusers", "kohya"]),  # embeddings in both
        ("sd3", ["adapter=lokr"], ["peft"]),  # diffusers cannot hold LoKr: the family's format that does
        ("sd15", ["export.formats=[peft]"], ["peft"]),  # given: as given
    ],
)
def test_unset_export_formats_are_the_familys_own_that_hold_what_trains(family, overrides, formats):
    from tuner.models import get_family
    from tuner.stages.export import _trained_parts, chosen_formats

    cfg = compose("lora", [f"model={family}", *overrides])
    assert chosen_formats(cfg, get_family(family), _trained_parts(cfg)) == formats


def test_a_single_file_that_cannot_hold_the_trained_text_encoder_is_refused():
    """Flux's single file is the transformer alone (as BFL ships it): a trained text encoder needs another format."""
    from tuner.models import checks

    cfg = compose("lora", ["model=flux", "text_encoder.train=lora", "export.formats=[single_file]"])
    with pytest.raises(ConfigError, match=r"holds the transformer only.*export.formats=\[single_file,merged\]"):
        checks.check(cfg)
    checks.check(compose("lora", ["model=flux", "text_encoder.train=lora", "export.formats=[single_file,peft]"]))
    checks.check(compose("lora", ["model=sd15", "text_encoder.train=lora", "export.formats=[single_file]"]))
