"""Bad configuration values are refused by validate, before anything runs or any folder is made: one line on
stderr (``tuner: config error: KEY=VALUE: the fix``), exit status 2, no traceback, no output folder."""

import pytest

from tests.helpers import make_photos
from tuner.__main__ import main
from tuner.checks import validate
from tuner.compose import compose
from tuner.config import SEED_MAX

pytestmark = pytest.mark.hostile  # the hostile-input corpus: pytest -m hostile

PROMPT = "a photo of sks ball"


@pytest.fixture
def lora_args(tmp_path, tiny_pipeline_dir):
    photos = make_photos(tmp_path / "photos")
    return [
        "recipe=lora",
        f"model.path={tiny_pipeline_dir}",
        f"data.instance_dir={photos}",
        f"data.instance_prompt={PROMPT}",
        f"output_dir={tmp_path / 'run'}",
    ]


@pytest.fixture
def generate_args(tmp_path, tiny_pipeline_dir):
    return [
        "recipe=generate",
        f"model.path={tiny_pipeline_dir}",
        "data.resolution=16",
        f"output_dir={tmp_path / 'run'}",
    ]


def refused(capsys, tmp_path, argv: list[str], *fragments: str) -> str:
    """main(argv) refuses the config: status 2, one line on stderr holding every fragment, no folder made."""
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("tuner: config error: "), err
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"
    assert not (tmp_path / "run").exists()
    return lines[0]


@pytest.mark.parametrize(
    "override, fragments",
    [
        # 1. the learning rate
        ("train.learning_rate=nan", ["train.learning_rate=nan", "a positive finite number"]),
        ("train.learning_rate=inf", ["train.learning_rate=inf", "a positive finite number"]),
        ("train.learning_rate=-inf", ["train.learning_rate=-inf", "a positive finite number"]),
        ("train.learning_rate=0", ["train.learning_rate=0.0", "a positive finite number"]),
        ("train.learning_rate=-1e-4", ["train.learning_rate=-0.0001", "a positive finite number"]),
        # 2. adapter dropout in [0, 1)
        ("adapter.dropout=-0.1", ["adapter.dropout=-0.1", "[0, 1)"]),
        ("adapter.dropout=1", ["adapter.dropout=1.0", "[0, 1)"]),
        ("adapter.dropout=1.5", ["adapter.dropout=1.5", "[0, 1)"]),
        ("adapter.dropout=nan", ["adapter.dropout=nan", "[0, 1)"]),
        # 3. resolutions
        ("data.resolution=0", ["data.resolution=0", "multiple of 8"]),
        ("data.resolution=-8", ["data.resolution=-8", "multiple of 8"]),
        ("model.resolution=0", ["model.resolution=0", "multiple of 8"]),  # data.resolution follows it
        ("model.resolution=-512", ["model.resolution=-512", "multiple of 8"]),
        # 4. clipping and warmup (0 keeps its meaning: no clipping)
        ("train.max_grad_norm=nan", ["train.max_grad_norm=nan", "0 for no clipping"]),
        ("train.max_grad_norm=-1", ["train.max_grad_norm=-1.0", "0 for no clipping"]),
        ("train.warmup_steps=-1", ["train.warmup_steps=-1", "0 or more"]),
        # 5. magnitudes, and NaN / inf anywhere (lists included)
        ("train.weight_decay=-0.01", ["train.weight_decay=-0.01", "0 or more"]),
        ("train.noise_offset=-0.1", ["train.noise_offset=-0.1", "0 (off)"]),
        ("train.input_perturbation=inf", ["train.input_perturbation=inf", "not nan or inf"]),
        ("train.huber_delta=0", ["train.huber_delta=0.0", "positive"]),
        ("train.snr_gamma=inf", ["train.snr_gamma=inf", "or null"]),
        ("train.ema_decay=nan", ["train.ema_decay=nan", "between 0 and 1"]),
        ("train.timestep_bias_multiplier=-2", ["train.timestep_bias_multiplier=-2.0", "positive factor"]),
        ("train.min_timestep=-1", ["train.min_timestep=-1", "0 or more"]),
        ("adapter.alpha=0", ["adapter.alpha=0.0", "positive"]),
        ("adapter.alpha=-8", ["adapter.alpha=-8.0", "positive"]),
        ("adapter.blocks=[{pattern:up_blocks.*,lr:0}]", ["adapter.blocks[0].lr=0.0", "or null"]),
        ("adapter.blocks=[{pattern:up_blocks.*,lr:nan}]", ["adapter.blocks[0].lr=nan", "or null"]),
        ("text_encoder.learning_rate=0", ["text_encoder.learning_rate=0.0", "or null"]),
        ("text_encoder.stop_at=nan", ["text_encoder.stop_at=nan", "(0, 1]"]),
        ("embedding.learning_rate=-1", ["embedding.learning_rate=-1.0", "or null"]),
        ("prior.loss_weight=-1", ["prior.loss_weight=-1.0", "0 or more"]),
        ("prior.num_class_images=-1", ["prior.num_class_images=-1", "0 or more"]),
        ("prior.sample_batch_size=0", ["prior.sample_batch_size=0", "at least 1"]),
        ("sample.steps=0", ["sample.steps=0", "at least 1"]),
        ("sample.guidance_scale=inf", ["sample.guidance_scale=inf", "not nan or inf"]),
        ("sample.display_size=0", ["sample.display_size=0", "size in pixels"]),
        ("eval.steps=0", ["eval.steps=0", "at least 1"]),
        ("eval.samples=0", ["eval.samples=0", "at least 1"]),
        ("eval.guidance_scale=nan", ["eval.guidance_scale=nan", "not nan or inf"]),
        ("validation.guidance_scale=-inf", ["validation.guidance_scale=-inf", "not nan or inf"]),
        ("generate.guidance_scale=nan", ["generate.guidance_scale=nan", "not nan or inf"]),
        ("generate.adapters=[{path:nowhere,weight:nan}]", ["generate.adapters[0].weight=nan", "not nan or inf"]),
        ("generate.strength=nan", ["generate.strength=nan", "(0, 1]"]),
        ("generate.post.sharpen=inf", ["generate.post.sharpen=inf", "not nan or inf"]),
        ("data.sources=[{path:nowhere,weight:inf}]", ["data.sources[0].weight=inf", "loss multiplier"]),
        ("data.sources=[{path:nowhere,weight:-1}]", ["data.sources[0].weight=-1.0", "loss multiplier"]),
        ("data.caption_dropout=nan", ["data.caption_dropout=nan", "[0, 1)"]),
        ("data.max_ratio=inf", ["data.max_ratio=inf", "not nan or inf"]),
        ("data.min_side=-1", ["data.min_side=-1", "0 or more"]),
        ("data.max_pixels=0", ["data.max_pixels=0", "positive pixel count"]),
        ("data.workers=-2", ["data.workers=-2", "process count"]),
        ("data.bucket_step=0", ["data.bucket_step=0", "multiple of 8"]),
        ("data.near_duplicate_bits=65", ["data.near_duplicate_bits=65", "0..64"]),
        ("data.near_duplicate_bits=-1", ["data.near_duplicate_bits=-1", "0..64"]),
        ("model.guidance=nan", ["model.guidance=nan", "not nan or inf"]),
        ("model.guidance=-1", ["model.guidance=-1.0", "0 or more"]),
        ("model.max_sequence_length=0", ["model.max_sequence_length=0", "token count"]),
        ("model.timestep_shift=0", ["model.timestep_shift=0.0", "positive shift"]),
        ("model.logit_std=-1", ["model.logit_std=-1.0", "standard deviation"]),
        ("subject.image_size=0", ["subject.image_size=0", "at least 8"]),
        ("base.unet_lr=0", ["base.unet_lr=0.0", "positive"]),
        ("checkpoints.every=-1", ["checkpoints.every=-1", "0 or more"]),
        ("checkpoints.keep=0", ["checkpoints.keep=0", "at least 1"]),
        # seeds: 0 .. 2**63 - 1
        ("seed=-1", ["seed=-1", f"0 to {SEED_MAX}"]),
        ("seed=99999999999999999999", ["seed=99999999999999999999", f"0 to {SEED_MAX}"]),
        ("prior.seed=-5", ["prior.seed=-5", f"0 to {SEED_MAX}"]),
        ("sample.seeds=[0,-1]", ["sample.seeds[1]=-1", f"0 to {SEED_MAX}"]),
        ("validation.seeds=[99999999999999999999]", ["validation.seeds[0]=99999999999999999999", "seed"]),
        ("generate.seed=-1", ["generate.seed=-1", f"0 to {SEED_MAX}"]),
    ],
)
def test_bad_numbers_are_refused_naming_key_value_and_fix(override, fragments, lora_args, tmp_path, capsys):
    refused(capsys, tmp_path, [*lora_args, override], *fragments)


@pytest.mark.parametrize(
    "override, fragments",
    [
        ("data.instance_prompt=a photo of ${nope}", ["data.instance_prompt=a photo of ${nope}", "'nope' not found"]),
        ("sample.prompts=['${foo.bar}']", ["sample.prompts[0]=${foo.bar}", "'foo.bar' not found"]),
        ("train.learning_rate=${train.nothere}", ["train.learning_rate=${train.nothere}", "not found"]),
        ("data.class_prompt=${oc.env:TUNER_TEST_NO_SUCH_VARIABLE}", ["data.class_prompt=", "TUNER_TEST_NO_SUCH"]),
    ],
)
def test_interpolations_that_do_not_resolve_are_refused_before_the_run_folder(
    override, fragments, lora_args, tmp_path, capsys
):
    line = refused(capsys, tmp_path, [*lora_args, override], *fragments)
    if "not found" in fragments[-1]:
        assert r"escape it as \${" in line  # how to write a literal ${


def test_an_escaped_interpolation_is_a_literal(lora_args, tmp_path):
    cfg = compose("lora", lora_args[1:] + [r"data.instance_prompt=a photo of \${sks}"])
    validate(cfg)
    assert cfg.data.instance_prompt == "a photo of ${sks}"


def test_a_valid_config_still_validates(lora_args, tmp_path):
    """The positive control: the same command with good values passes, and validating makes no folder."""
    good = ["train.learning_rate=1e-4", "adapter.dropout=0.1", "train.max_grad_norm=0", "train.warmup_steps=0"]
    good += ["prior.num_class_images=0", "data.workers=0", f"seed={SEED_MAX}", "data.sources=[]"]
    cfg = compose("lora", lora_args[1:] + good)
    validate(cfg)
    assert cfg.train.max_grad_norm == 0 and cfg.seed == SEED_MAX
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "line, fragments",
    [
        (f"{PROMPT} --l inf", ["prompts.txt:1", "--l inf", "finite guidance"]),
        (f"{PROMPT} --l -inf", ["prompts.txt:1", "--l -inf", "finite guidance"]),
        (f"{PROMPT} --l nan", ["prompts.txt:1", "--l nan", "finite guidance"]),
        (f"{PROMPT} --d -1", ["prompts.txt:1", "--d -1", f"0 to {SEED_MAX}"]),
        (f"{PROMPT} --d 99999999999999999999", ["prompts.txt:1", "--d 99999999999999999999", f"0 to {SEED_MAX}"]),
        (f"# a comment\n{PROMPT} --d {SEED_MAX + 1}", ["prompts.txt:2", f"--d {SEED_MAX + 1}", "seed"]),
    ],
)
def test_bad_prompt_file_options_are_refused_naming_file_and_line(line, fragments, generate_args, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(line + "\n", encoding="utf-8")
    refused(capsys, tmp_path, [*generate_args, f"generate.prompt_file={prompts}"], *fragments)


def test_a_prompt_file_that_is_not_utf8_is_refused_naming_file_and_line(generate_args, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes(f"{PROMPT}\nun café --s 3\n".encode("latin-1"))
    refused(
        capsys,
        tmp_path,
        [*generate_args, f"generate.prompt_file={prompts}"],
        f"generate.prompt_file={prompts}:2",
        "not UTF-8",
        "0xe9",
        "save the file as UTF-8",
    )


def test_seeds_counted_past_the_largest_are_refused(generate_args, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"{PROMPT} --d {SEED_MAX}\n")
    args = [*generate_args, "generate.images_per_prompt=2"]
    refused(capsys, tmp_path, [*args, f"generate.prompt_file={prompts}"], f"prompts.txt:1: --d {SEED_MAX}", "up to")
    refused(
        capsys,
        tmp_path,
        [*args, f"generate.seed={SEED_MAX}", "generate.prompts=[a,b]"],
        f"generate.seed={SEED_MAX}",
        "generate.prompts[0]",
        "images_per_prompt",
    )


def test_a_prompt_file_at_the_edges_still_validates(generate_args, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"un café --l 0 --d {SEED_MAX - 1}\n{PROMPT} --l -2.5 --d 0\n", encoding="utf-8")
    args = [*generate_args[1:], f"generate.prompt_file={prompts}", "generate.images_per_prompt=2"]
    validate(compose("generate", args))
    assert not (tmp_path / "run").exists()
