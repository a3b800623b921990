"""Inputs that used to give a wrong result with exit 0: each is now refused with one ``tuner: ...`` line naming the
file or key and the fix (exit 2), and no file outside the run folder changes (sha256 of the user's folders).

- a checkpoint whose bytes changed in place (a flipped bit in a sharded ``.distcp`` or in ``trained.safetensors``):
  its sha256 differs from the one saved with it;
- an export whose float16 cast overflows to infinity;
- a CLIP or DINO folder that is damaged, of another kind, or lacks weights;
- ``data.val_dir`` that shares images with ``data.instance_dir`` (by path or by content).
"""

import shutil
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from PIL import Image
from safetensors import safe_open

from tests.helpers import FORMATS, PROMPT, make_photos, train_in_process
from tests.test_hostile_files import tree
from tuner.__main__ import main

pytestmark = pytest.mark.hostile  # the hostile-input corpus: pytest -m hostile


def cli(capsys, *args: str) -> tuple[int, str, str]:
    """``python -m tuner ARGS`` in this process: the exit code, and what it printed on stdout and stderr."""
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    capsys.readouterr()
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("tuner:")]
    assert "Traceback" not in err, err
    assert len(lines) == 1, err
    return lines[0]


def lora_args(tiny: Path, photos: Path, *more: str) -> list[str]:
    """train_in_process's run as a command line (tests/helpers.py)."""
    return [
        "recipe=lora",
        f"model.path={tiny}",
        "data.resolution=16",
        f"data.instance_dir={photos}",
        f"data.instance_prompt={PROMPT}",
        "train.batch_size=2",
        "train.learning_rate=1e-2",
        "train.log_every=1",
        "validation.every=0",
        "log.tensorboard=false",
        "stages=[base,prepare,train,export]",
        FORMATS,
        *more,
    ]


def flip_a_byte(file: Path, at: int) -> None:
    """One byte of ``file`` changed in place: every size, header and offset stays right."""
    data = bytearray(file.read_bytes())
    data[at] ^= 0x10
    file.write_bytes(bytes(data))


# ---------------------------------------------------------------- checkpoints altered in place

CHECKPOINTED = ["train.max_steps=4", "checkpoints.every=2", "checkpoints.keep=2", "export.formats=[diffusers]"]


@pytest.fixture(scope="module", params=["ddp", "fsdp"])
def checkpointed(request, tmp_path_factory, tiny_pipeline_dir):
    """A run of 4 steps with checkpoints at 2 and 4, saved whole or (distributed.strategy=fsdp, one process, as
    several processes save them) sharded by torch.distributed.checkpoint; and its arguments."""
    tmp = tmp_path_factory.mktemp(request.param)
    more = [*CHECKPOINTED, f"distributed.strategy={request.param}"]
    run = train_in_process(tmp, tiny_pipeline_dir, *more)
    return run.dir, lora_args(tiny_pipeline_dir, tmp / "photos", *more), tmp / "photos"


def _data_file(checkpoint: Path) -> tuple[Path, int]:
    """The file holding the trained tensors' bytes, and an offset inside the first tensor's data."""
    sharded = sorted((checkpoint / "sharded").glob("*.distcp"))
    if sharded:
        return sharded[0], sharded[0].stat().st_size // 2
    file = checkpoint / "trained.safetensors"
    with open(file, "rb") as f:
        header = int.from_bytes(f.read(8), "little")
    with safe_open(file, "pt") as f:
        first = f.get_tensor("0")
    return file, 8 + header + first.numel() * first.element_size() // 2


def test_a_checkpoint_altered_in_place_is_refused_naming_the_file_and_auto_takes_an_earlier_one(
    capsys, checkpointed, tiny_pipeline_dir, tmp_path
):
    """A flipped bit in the tensors' data (sharded or not) has every size right: it was resumed from silently, or
    surfaced as torch's UnpicklingError. Its sha256 differs from the one saved with the checkpoint: resume=PATH
    refuses it naming the file; resume=auto says so and resumes from the step before; the damaged one is kept."""
    source, args, photos = checkpointed
    folder = tmp_path / "run"
    shutil.copytree(source, folder)
    damaged = folder / "checkpoints" / "step-0000004"
    file, at = _data_file(damaged)
    flip_a_byte(file, at)
    mine = {"photos": tree(photos), "base": tree(tiny_pipeline_dir)}
    before = tree(damaged)

    code, out, err = cli(capsys, *args, f"output_dir={folder}", f"resume={damaged}")
    line = one_line(err)
    assert code == 2, err
    assert f"resume={damaged}: the checkpoint is damaged: {file} is damaged: its sha256 differs" in line, line
    assert f"resume={folder / 'checkpoints' / 'step-0000002'}" in line and "resume=auto" in line  # the fixes
    assert "weights_only" not in line
    assert tree(damaged) == before

    code, out, err = cli(capsys, *args, f"output_dir={folder}", "resume=auto", "train.max_steps=5")
    assert code == 0, err[-3000:]
    assert f"skipping the damaged checkpoint {damaged}: {file.relative_to(damaged)} is damaged: its sha256" in out, out
    assert f"resumed from {folder / 'checkpoints' / 'step-0000002'} at step 2 of 5" in out
    assert tree(damaged.with_name("step-0000004.damaged")) == before  # kept, byte for byte, when step 4 came again
    assert {"photos": tree(photos), "base": tree(tiny_pipeline_dir)} == mine


def test_a_checkpoint_without_its_sha256_is_refused(capsys, checkpointed, tmp_path):
    source, args, _ = checkpointed
    folder = tmp_path / "run"
    shutil.copytree(source, folder)
    checkpoint = folder / "checkpoints" / "step-0000004"
    (checkpoint / "sha256.json").unlink()
    code, out, err = cli(capsys, *args, f"output_dir={folder}", f"resume={checkpoint}")
    assert code == 2 and f"{checkpoint / 'sha256.json'} is missing" in one_line(err), err


# ---------------------------------------------------------------- an export whose cast overflows


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_pipeline_dir):
    """A LoRA run's diffusers file (U-Net only)."""
    tmp = tmp_path_factory.mktemp("exported")
    run = train_in_process(tmp, tiny_pipeline_dir, "export.formats=[diffusers]")
    return run.dir / "diffusers" / "pytorch_lora_weights.safetensors"


@pytest.mark.parametrize(
    "setting, fmt, scale, names",
    [
        # a LoRA value past float16's 65504: the adapter formats' cast, checked before anything is written
        ("export.dtype=float16", "[diffusers,kohya,peft]", 1e5, ("export: unet.", "to_q.lora_B", "nothing")),
        # values float16 holds, whose product fused into the base does not: the format's own cast
        ("export.single_file_dtype=float16", "[single_file]", 300.0, ("export single_file: ", "to_q", "single_file")),
        ("export.variant=fp16", "[merged]", 300.0, ("export merged: ", "to_q", "merged")),
    ],
)
def test_an_export_that_overflows_in_its_dtype_is_refused_naming_the_tensor(
    capsys, exported, tiny_pipeline_dir, tmp_path, setting, fmt, scale, names
):
    from safetensors.torch import load_file, save_file

    with safe_open(exported, "pt") as f:
        metadata = f.metadata()
    state = load_file(exported)
    mine = tmp_path / "mine"
    mine.mkdir()
    for key in [k for k in state if "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q" in k]:
        state[key] = torch.full_like(state[key], scale if scale < 1e4 else 1.0)
        if "lora_B" in key:
            state[key][0, 0] = scale  # finite in float32 (the diverged-run check passes it)
    save_file(state, mine / "big.safetensors", metadata=metadata)
    before = {"mine": tree(mine), "base": tree(tiny_pipeline_dir)}
    out = tmp_path / "out"
    file = mine / "big.safetensors"
    code, _, err = cli(capsys, "recipe=export", f"model.path={tiny_pipeline_dir}", f"checkpoint={file}",
                       f"export.formats={fmt}", setting, f"output_dir={out}")  # fmt: skip
    line = one_line(err)
    key, value = setting.split("=")
    assert code == 2, err
    assert all(n in line for n in names) and f"is infinite as {value}" in line, line
    assert f"was not written; set {key}=" in line or "so nothing was exported; set export.dtype=bfloat16" in line
    assert key in line.rsplit("; set ", 1)[1]  # the fix names the setting
    assert not [p for p in out.iterdir() if p.name not in ("config.yaml", "tuner-run.json")]  # no format written
    assert {"mine": tree(mine), "base": tree(tiny_pipeline_dir)} == before


# ---------------------------------------------------------------- feature models (eval.clip, eval.dino)

# a run that validates (were it not refused, a test that fails does so in seconds)
CHEAP = ["train.max_steps=1", "validation.seeds=[0]", "validation.steps=1", "validation.samples=1"]


@pytest.fixture(scope="module")
def feature_models(tmp_path_factory):
    from tuner.models.tiny import make_tiny_feature_model

    root = tmp_path_factory.mktemp("features")
    return {kind: make_tiny_feature_model(root / kind, kind) for kind in ("clip", "dino")}


def _rewrite_weights(folder: Path, change) -> None:
    from safetensors.torch import load_file, save_file

    state = load_file(folder / "model.safetensors")
    save_file(change(state), folder / "model.safetensors", metadata={"format": "pt"})


def _no_vision_tower(folder: Path) -> None:
    _rewrite_weights(folder, lambda state: {k: v for k, v in state.items() if not k.startswith("vision_model.")})


def _with_a_head(folder: Path) -> None:
    _rewrite_weights(folder, lambda state: {**state, "classifier.weight": torch.zeros(3, 32)})


def _truncate(file: Path) -> None:
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])


FOLDERS = {  # name: (kind, made from, damage, what the line says)
    "no_config": ("clip", "clip", lambda f: (f / "config.json").unlink(), "(config.json missing)"),
    "bad_config": ("dino", "dino", lambda f: (f / "config.json").write_text("{not json"), "config.json does not parse"),
    "dino_as_clip": (
        "clip",
        "dino",
        lambda f: None,
        "describes a dinov2 model (model_type), not one of clip",
    ),
    "clip_as_dino": (
        "dino",
        "clip",
        lambda f: None,
        "describes a clip model (model_type), not one of dinov2",
    ),
    "no_weights": ("clip", "clip", lambda f: (f / "model.safetensors").unlink(), "no weights in it"),
    "truncated": ("dino", "dino", lambda f: _truncate(f / "model.safetensors"), "model.safetensors is truncated"),
    "no_vision_tower": ("clip", "clip", _no_vision_tower, "its weights lack the vision_model.embeddings"),
    "with_a_head": ("dino", "dino", _with_a_head, "its weights hold classifier, which the dinov2 model"),
}


@pytest.mark.parametrize("case", FOLDERS)
def test_a_damaged_or_wrong_kind_feature_model_folder_is_refused_at_config_time(
    capsys, case, feature_models, tiny_pipeline_dir, tmp_path
):
    kind, source, damage, says = FOLDERS[case]
    folder = tmp_path / "models" / case
    shutil.copytree(feature_models[source], folder)
    damage(folder)
    photos = make_photos(tmp_path / "photos")
    before = {"models": tree(tmp_path / "models"), "photos": tree(photos), "base": tree(tiny_pipeline_dir)}
    out = tmp_path / "run"
    code, _, err = cli(capsys, *lora_args(tiny_pipeline_dir, photos, f"eval.{kind}={folder}", "validation.every=1",
                                          *CHEAP, f"output_dir={out}"))  # fmt: skip
    line = one_line(err)
    assert code == 2 and line.startswith(f"tuner: config error: eval.{kind}={folder}: "), line
    assert says in line and "save_pretrained" in line, line
    assert not out.exists()  # refused before the run folder is made
    assert {"models": tree(tmp_path / "models"), "photos": tree(photos), "base": tree(tiny_pipeline_dir)} == before


def test_a_feature_model_lacking_one_weight_is_refused_by_name_not_loaded_at_random(
    capsys, feature_models, tiny_pipeline_dir, tmp_path
):
    """One tensor of the vision tower gone (its part is there, so the headers pass): transformers would initialise
    it at random, with no warning, and every clip_i would be noise. The first validation step refuses it."""
    folder = tmp_path / "models" / "clip"
    shutil.copytree(feature_models["clip"], folder)
    gone = "vision_model.post_layernorm.weight"
    _rewrite_weights(folder, lambda state: {k: v for k, v in state.items() if k != gone})
    photos = make_photos(tmp_path / "photos")
    before = {"models": tree(tmp_path / "models"), "photos": tree(photos), "base": tree(tiny_pipeline_dir)}
    code, _, err = cli(capsys, *lora_args(tiny_pipeline_dir, photos, f"eval.clip={folder}", "validation.every=1",
                                          *CHEAP, f"output_dir={tmp_path / 'run'}"))  # fmt: skip
    line = one_line(err)
    assert code == 2, err
    assert f"eval.clip={folder}: its weights file lacks 1 of the CLIPModel's tensors" in line, line
    assert f"({gone})" in line and "save_pretrained" in line, line
    assert {"models": tree(tmp_path / "models"), "photos": tree(photos), "base": tree(tiny_pipeline_dir)} == before


# ---------------------------------------------------------------- held-out images the run trains on


def _held_out(tmp_path: Path, case: str) -> tuple[Path, Path, str]:
    """(data.instance_dir, data.val_dir, what the line says) of each way a held-out folder can be trained on."""
    photos = make_photos(tmp_path / "all" / "photos", 4)
    if case == "same":
        return photos, photos, f"data.val_dir={photos} is data.instance_dir={photos}:"
    if case == "link":  # another name for the same folder
        (tmp_path / "link").symlink_to(photos)
        return photos, tmp_path / "link", f"data.val_dir={tmp_path / 'link'} is data.instance_dir={photos}:"
    if case == "inside":
        (photos / "held").mkdir()
        shutil.copy(photos / "photo_3.png", photos / "held" / "photo_3.png")
        return photos, photos / "held", f"data.val_dir={photos / 'held'} is inside data.instance_dir={photos}:"
    if case == "holds":
        make_photos(tmp_path / "all" / "more", 2)
        return photos, tmp_path / "all", f"data.val_dir={tmp_path / 'all'} holds data.instance_dir={photos}:"
    held = tmp_path / "all" / "held"  # an image of its own, and a training image under another name
    held.mkdir()
    Image.new("RGB", (40, 40), (10, 200, 10)).save(held / "green.png")
    shutil.copy(photos / "photo_2.png", held / "zz_copy.png")
    line = (f"data.val_dir={held} and data.instance_dir={photos} hold the same image: {held / 'zz_copy.png'} is "
            f"{photos / 'photo_2.png'} by content (sha256)")  # fmt: skip
    return photos, held, line


@pytest.mark.parametrize("case", ["same", "link", "inside", "holds", "content"])
def test_held_out_images_the_run_trains_on_are_refused_at_config_time(capsys, case, tiny_pipeline_dir, tmp_path):
    photos, held, says = _held_out(tmp_path, case)
    before = {"data": tree(tmp_path / "all"), "base": tree(tiny_pipeline_dir)}
    out = tmp_path / "run"
    code, _, err = cli(capsys, *lora_args(tiny_pipeline_dir, photos, f"data.val_dir={held}", "validation.every=1",
                                          *CHEAP, f"output_dir={out}"))  # fmt: skip
    line = one_line(err)
    assert code == 2 and f"tuner: config error: {says}" in line, line
    assert "held-out loss would score images the run trains on" in line and "data.val_split" in line, line
    assert not out.exists()  # refused before the run folder is made
    assert {"data": tree(tmp_path / "all"), "base": tree(tiny_pipeline_dir)} == before


def test_held_out_images_apart_from_the_trained_ones_are_taken(tiny_pipeline_dir, tmp_path):
    """Files of the same name, or of the same size, but other content, are not the same image."""
    from tuner.checks import validate
    from tuner.compose import compose

    photos = make_photos(tmp_path / "photos", 3)
    held = tmp_path / "held"
    held.mkdir()
    Image.new("RGB", (40, 40), (10, 200, 10)).save(held / "green.png")
    data = bytearray((photos / "photo_0.png").read_bytes())
    data[-20] ^= 0xFF  # the same size, another sha256
    (held / "photo_0.png").write_bytes(bytes(data))
    args = lora_args(tiny_pipeline_dir, photos, f"data.val_dir={held}", f"output_dir={tmp_path / 'run'}")
    validate(compose("lora", [a for a in args if not a.startswith("recipe=")]))
