"""Resuming from checkpoints that cannot be continued: damaged files, other settings, steps past the end.

One real run is trained once (LoRA rank 4 with EMA, checkpoints at steps 2, 4 and 6); each case copies
its folder, damages or re-configures it, and resumes through ``python -m tuner``'s ``main`` in this
process. A refusal is one ``tuner: ...`` line on stderr naming the file or the settings, exit status 2,
no traceback; ``resume=auto`` steps over a damaged checkpoint to the newest intact one and never
deletes or rewrites the damaged one.
"""

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from safetensors.torch import load_file

from tests.helpers import PROMPT, train_in_process
from tuner.__main__ import main
from tuner.training import checkpoint_files, checkpoints

pytestmark = pytest.mark.hostile  # the hostile-input corpus: pytest -m hostile

SETTINGS = [
    "adapter.rank=4",
    "adapter.alpha=4",
    "train.ema_decay=0.9",
    "train.max_steps=6",
    "validation.every=0",
    "log.tensorboard=false",
    "export.formats=[diffusers]",
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_pipeline_dir):
    """The run folder of 6 steps with checkpoints at 2, 4 and 6, and the arguments that made it."""
    tmp = tmp_path_factory.mktemp("hostile")
    run = train_in_process(tmp, tiny_pipeline_dir, *SETTINGS, "checkpoints.every=2", "checkpoints.keep=3")
    assert [p.name for p in checkpoint_files.find(run.dir / "checkpoints")] == [
        "step-0000002",
        "step-0000004",
        "step-0000006",
    ]
    args = [  # what train_in_process passed, as a command line
        "recipe=lora",
        f"model.path={tiny_pipeline_dir}",
        "data.resolution=16",
        f"data.instance_dir={tmp / 'photos'}",
        f"data.instance_prompt={PROMPT}",
        "train.batch_size=2",
        "train.learning_rate=1e-2",
        "train.log_every=1",
        "stages=[base,prepare,train,export]",
        *SETTINGS,
        "checkpoints.every=2",
        "checkpoints.keep=3",
    ]
    return run.dir, args


@pytest.fixture
def copy(trained, tmp_path, capsys):
    """A fresh copy of the trained run folder, and a function that resumes it with more arguments."""
    source, args = trained
    folder = tmp_path / "run"
    shutil.copytree(source, folder)

    def resume(*more):
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        capsys.readouterr()
        code = main([*args, f"output_dir={folder}", *more])
        out, err = capsys.readouterr()
        return code, out, err

    return folder, resume


def step(folder: Path, n: int) -> Path:
    return folder / "checkpoints" / f"step-{n:07d}"


def digest(folder: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def refused(code, err) -> str:
    """The one ``tuner:`` line of a refusal (exit 2, no traceback)."""
    assert code == 2, err[-3000:]
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("tuner")]
    assert len(lines) == 1 and lines[0].startswith("tuner: "), err
    return lines[0]


def truncate(file: Path, keep: float = 0.5) -> None:
    data = file.read_bytes()
    file.write_bytes(data[: int(len(data) * keep)])


def flip_a_byte(file: Path) -> None:
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    file.write_bytes(bytes(data))


# ---------------------------------------------------------------- other settings


def test_another_adapter_rank_is_refused_naming_both_values(copy):
    folder, resume = copy
    checkpoint = step(folder, 4)
    code, out, err = resume(f"resume={checkpoint}", "adapter.rank=8", "adapter.alpha=4")
    line = refused(code, err)
    assert f"resume={checkpoint}: the checkpoint was trained with adapter.rank=4, this run has adapter.rank=8;" in line
    assert "without resume=" in line


def test_every_differing_setting_is_named_with_both_values(copy):
    folder, resume = copy
    code, out, err = resume(
        "resume=auto",
        "adapter.targets=attn",
        "adapter.use_rslora=true",
        "train.optimizer=sgd",
        "train.ema_decay=null",
        "text_encoder.train=lora",
        "embedding.tokens=['<sks>']",
        "train.learning_rate=1e-3",
    )
    line = refused(code, err)
    was, now = line.split(", this run has ")
    for key, old, new in [
        ("adapter.targets", "attn_ff", "attn"),
        ("adapter.use_rslora", "false", "true"),
        ("train.optimizer", "adamw", "sgd"),
        ("train.ema_decay", "0.9", "null"),
        ("text_encoder.train", "none", "lora"),
        ("embedding.tokens", "[]", "[<sks>]"),
        ("train.learning_rate", "0.01", "0.001"),
    ]:
        assert f"{key}={old}" in was and f"{key}={new}" in now, (key, line)
    assert str(step(folder, 6)) in was  # resume=auto names the checkpoint it took


def test_another_adapter_type_or_model_is_refused(copy, tmp_path, tiny_pipeline_dir):
    folder, resume = copy
    code, out, err = resume(f"resume={step(folder, 2)}", "adapter=loha", "export.formats=[peft]")
    assert "adapter.type=lora" in refused(code, err) and "adapter.type=loha" in err
    other = tmp_path / "other_model"
    shutil.copytree(tiny_pipeline_dir, other)
    code, out, err = resume(f"resume={step(folder, 2)}", f"model.path={other}")
    assert f"model.path={tiny_pipeline_dir}" in refused(code, err) and f"model.path={other}" in err


def test_settings_that_may_change_on_resume_are_not_refused(trained, copy):
    """More steps, other logging, checkpointing, validation and export: the run goes on from the checkpoint."""
    folder, resume = copy
    code, out, err = resume(
        f"resume={step(folder, 4)}",
        "train.max_steps=8",
        "train.log_every=2",
        "checkpoints.every=4",
        "checkpoints.keep=5",
        "validation.every=0",
        "export.formats=[diffusers,peft]",
    )
    assert code == 0, err[-3000:]
    assert f"resumed from {step(folder, 4)} at step 4 of 8" in out
    assert checkpoint_files.find(folder / "checkpoints")[-1].name == "step-0000008"
    assert torch.load(step(folder, 8) / "state.pt", weights_only=True)["step"] == 8


def test_without_config_yaml_the_tensor_shapes_are_checked_naming_the_file(copy):
    folder, resume = copy
    checkpoint = step(folder, 4)
    (checkpoint / "config.yaml").unlink()
    code, out, err = resume(f"resume={checkpoint}", "adapter.rank=8", "adapter.alpha=4")
    line = refused(code, err)
    assert f"{checkpoint / 'trained.safetensors'}: trained tensor 0 has the shape" in line
    code, out, err = resume(f"resume={checkpoint}", "train.optimizer=sgd")
    assert f"{checkpoint / 'state.pt'} holds the state of another optimizer (train.optimizer)" in refused(code, err)
    code, out, err = resume(f"resume={checkpoint}", "train.ema_decay=null")
    assert f"{checkpoint / 'state.pt'} holds an EMA" in refused(code, err)


# ---------------------------------------------------------------- damaged files, resume=PATH


@pytest.mark.parametrize(
    "file, damage",
    [
        ("trained.safetensors", lambda f: truncate(f, 0.5)),
        ("trained.safetensors", lambda f: truncate(f, 0.001)),  # inside the header
        ("state.pt", lambda f: f.write_bytes(b"")),
        ("state.pt", lambda f: truncate(f, 0.9)),
        ("state.pt", lambda f: f.write_bytes(b"not a torch file" * 100)),
        ("state.pt", flip_a_byte),  # every size still right: the zip's checksums find it
    ],
    ids=["safetensors-truncated", "safetensors-header-cut", "state-empty", "state-truncated", "state-garbage", "flip"],
)
def test_a_damaged_checkpoint_named_by_resume_is_refused_naming_the_file(copy, file, damage):
    folder, resume = copy
    checkpoint = step(folder, 4)
    damage(checkpoint / file)
    before = digest(checkpoint)
    code, out, err = resume(f"resume={checkpoint}")
    line = refused(code, err)
    assert f"the checkpoint is damaged: {checkpoint / file}" in line
    assert "resume=auto" in line and f"resume={step(folder, 2)}" in line  # the fixes: auto, or the step before
    assert digest(checkpoint) == before


# ---------------------------------------------------------------- resume=auto


def test_auto_skips_a_damaged_newest_checkpoint_and_keeps_it(trained, copy):
    """The newest checkpoint is truncated: resume=auto says so, continues from the one before, ends with the
    uninterrupted run's adapter, and the damaged checkpoint is kept, byte for byte, beside the new one."""
    source, _ = trained
    folder, resume = copy
    damaged = step(folder, 6)
    truncate(damaged / "trained.safetensors", 0.7)
    before = digest(damaged)
    code, out, err = resume("resume=auto")
    assert code == 0, err[-3000:]
    skipped = [line for line in out.splitlines() if "skipping" in line]
    assert len(skipped) == 1, out
    assert skipped[0].startswith(f"[tuner] resume=auto: skipping the damaged checkpoint {damaged}: ")
    assert "trained.safetensors is truncated" in skipped[0]
    assert f"resumed from {step(folder, 4)} at step 4 of 6" in out
    kept = damaged.with_name("step-0000006.damaged")
    assert digest(kept) == before  # never deleted, never written over
    assert [p.name for p in checkpoint_files.find(folder / "checkpoints")] == [f"step-000000{n}" for n in (2, 4, 6)]
    losses = [json.loads((f / "summary.json").read_text())["metrics"]["train_loss"] for f in (folder, source)]
    assert losses[0] == losses[1]
    resumed = load_file(folder / "diffusers" / "pytorch_lora_weights.safetensors")
    whole = load_file(source / "diffusers" / "pytorch_lora_weights.safetensors")
    assert resumed.keys() == whole.keys() and all(torch.equal(resumed[k], whole[k]) for k in whole)


def test_auto_leaves_a_damaged_checkpoint_it_does_not_reach_untouched(copy):
    folder, resume = copy
    damaged = step(folder, 6)
    (damaged / "state.pt").write_bytes(b"")
    before = digest(damaged)
    code, out, err = resume("resume=auto", "train.max_steps=5")
    assert code == 0, err[-3000:]
    assert f"skipping the damaged checkpoint {damaged}: state.pt is empty (0 bytes)" in out
    assert f"resumed from {step(folder, 4)} at step 4 of 5" in out
    assert digest(damaged) == before
    assert torch.load(step(folder, 5) / "state.pt", weights_only=True)["step"] == 5


def test_auto_with_no_intact_checkpoint_refuses_listing_them(copy):
    folder, resume = copy
    (step(folder, 2) / "trained.safetensors").unlink()
    (step(folder, 4) / "state.pt").write_bytes(b"")
    flip_a_byte(step(folder, 6) / "state.pt")
    before = {n: digest(step(folder, n)) for n in (2, 4, 6)}
    code, out, err = resume("resume=auto")
    line = refused(code, err)
    assert f"resume=auto: no intact checkpoint in {folder / 'checkpoints'}" in line
    assert "step-0000002 (trained.safetensors is missing)" in line
    assert "step-0000004 (state.pt is empty (0 bytes))" in line
    assert "step-0000006 (state.pt is damaged (its record" in line
    assert {n: digest(step(folder, n)) for n in (2, 4, 6)} == before


# ---------------------------------------------------------------- steps


def test_a_checkpoint_past_max_steps_is_refused(copy):
    folder, resume = copy
    checkpoint = step(folder, 4)
    code, out, err = resume(f"resume={checkpoint}", "train.max_steps=2")
    line = refused(code, err)
    assert f"resume={checkpoint}: the checkpoint is at step 4, past train.max_steps=2; raise train.max_steps" in line


def test_a_checkpoint_at_max_steps_says_training_is_complete_and_runs_the_later_stages(copy):
    """A run stopped after its last step (a signal during the last step, a crash in the export): resuming
    trains nothing, says so, and exports the checkpoint's weights."""
    folder, resume = copy
    shutil.rmtree(folder / "diffusers")
    code, out, err = resume("resume=auto")
    assert code == 0, err[-3000:]
    assert f"resumed from {step(folder, 6)} at step 6 of 6" in out
    assert "training is already complete" in out
    assert (folder / "diffusers" / "pytorch_lora_weights.safetensors").is_file()


# ---------------------------------------------------------------- the integrity check itself


def test_damage_finds_bytes_appended_to_the_tensors_file(trained, tmp_path):
    source, _ = trained
    checkpoint = tmp_path / "step-0000004"
    shutil.copytree(step(source, 4), checkpoint)
    assert checkpoint_files.damage(checkpoint) is None
    file = checkpoint / "trained.safetensors"
    file.write_bytes(file.read_bytes() + b"\0")
    assert checkpoint_files.damage(checkpoint)[1].startswith("is damaged")


def test_config_differences_count_only_what_the_state_depends_on(tmp_path, monkeypatch):
    import yaml
    from omegaconf import OmegaConf

    from tuner.compose import compose

    monkeypatch.chdir(tmp_path)
    (tmp_path / "model").mkdir()

    def config(*overrides):
        return yaml.safe_load(OmegaConf.to_yaml(compose("lora", ["model.path=model", *overrides]), resolve=True))

    def differ(saved, current):
        return [key for key, _, _ in checkpoints.config_differences(saved, current)]

    base = config()
    assert differ(base, config("train.max_steps=5000", "train.log_every=7", "checkpoints.every=9")) == []
    assert differ(base, config(f"model.path={tmp_path / 'model'}")) == []  # the same folder, written otherwise
    assert differ(base, config("adapter.rank=16")) == ["adapter.rank"]
    # a full fine-tune has no rank: only the adapter type is named
    assert differ(config("adapter=full"), config("adapter=full", "adapter.rank=16")) == []
    assert differ(base, config("adapter=full")) == ["adapter.type"]
    # one_cycle fixes its length in its state; the other schedules follow train.max_steps
    assert differ(config("train.lr_scheduler=one_cycle"), config("train.lr_scheduler=one_cycle", "train.max_steps=9"))
    assert differ(config("train.lr_scheduler=cosine"), config("train.lr_scheduler=cosine", "train.max_steps=9")) == []
    older = config()
    del older["adapter"]["use_rslora"]  # a checkpoint of a version without the setting
    assert differ(older, config("adapter.use_rslora=true")) == []
