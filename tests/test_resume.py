"""Checkpoints and resume: a run stopped anywhere and resumed ends with the same adapter, bit for bit."""

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import adapter, assert_same, make_photos, train_in_process
from tuner.checks import validate
from tuner.compose import compose
from tuner.errors import ConfigError

# LoRA on the U-Net and text encoder, EMA, caption dropout, cosine schedule: every piece of state matters
SETTINGS = [
    "text_encoder.train=lora",
    "train.ema_decay=0.9",
    "data.caption_dropout=0.3",
    "train.lr_scheduler=cosine",
    "train.warmup_steps=2",
    "train.batch_size=2",
]


def test_resume_from_a_checkpoint_ends_bit_identical(tmp_path, tiny_pipeline_dir):
    whole = train_in_process(
        tmp_path,
        tiny_pipeline_dir,
        *SETTINGS,
        "train.max_steps=6",
        "checkpoints.every=2",
        "checkpoints.keep=3",
        name="whole",
    )
    saved = sorted(p.name for p in (whole.dir / "checkpoints").iterdir())
    assert saved == ["step-0000002", "step-0000004", "step-0000006"]
    resumed = train_in_process(
        tmp_path,
        tiny_pipeline_dir,
        *SETTINGS,
        "train.max_steps=6",
        f"resume={whole.dir / 'checkpoints' / 'step-0000002'}",
        name="resumed",
    )
    assert_same(adapter(whole.dir), adapter(resumed.dir))
    assert resumed.metrics["train_loss"] == whole.metrics["train_loss"]
    assert resumed.metrics["epochs"] == whole.metrics["epochs"] == 3  # 3 images, batches of 2: 2 steps an epoch
    assert (whole.dir / "checkpoints" / "step-0000004" / "config.yaml").read_text().count("max_steps: 6") == 1


class Tuner:
    """``python -m tuner`` in a child process, its output going to files (a pipe nobody reads could fill up
    and stall the child before it reaches the step a test waits for)."""

    count = 0

    def __init__(self, args, home, cwd):
        Tuner.count += 1
        self.out, self.err = Path(cwd) / f"out{Tuner.count}.txt", Path(cwd) / f"err{Tuner.count}.txt"
        env = {**os.environ, "TUNER_HOME": str(home), "PYTHONUNBUFFERED": "1"}
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "tuner", *args], cwd=cwd, env=env, stdout=out, stderr=err
            )

    def poll(self):
        return self.process.poll()

    def send_signal(self, signum):
        self.process.send_signal(signum)

    @property
    def returncode(self):
        return self.process.returncode

    def communicate(self, timeout=None):
        self.process.wait(timeout=timeout)
        return self.out.read_text(), self.err.read_text()


def tuner(args, home, cwd):
    return Tuner(args, home, cwd)


def wait_for(path: Path, process, timeout=300):
    start = time.time()
    while not path.exists():
        assert process.poll() is None, process.communicate()
        assert time.time() - start < timeout
        time.sleep(0.05)


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory, tiny_pipeline_dir):
    tmp = tmp_path_factory.mktemp("cli")
    photos = make_photos(tmp / "photos")
    args = [
        "recipe=lora",
        f"model.path={tiny_pipeline_dir}",
        "data.resolution=16",
        f"data.instance_dir={photos}",
        "data.instance_prompt=a photo of sks ball",
        "train.max_steps=60",
        "train.learning_rate=1e-2",
        "stages=[base,prepare,train,export]",
        *SETTINGS,
    ]
    whole = tuner([*args, f"output_dir={tmp / 'whole'}"], tmp / "home", tmp)
    out, err = whole.communicate(timeout=600)
    assert whole.returncode == 0, err[-3000:]
    return tmp, args, adapter(tmp / "whole")


@pytest.mark.e2e
def test_sigkill_at_a_random_step_then_resume_auto_three_times(cli_runs):
    """Killed with SIGKILL after a random checkpoint, three times, each resumed with resume=auto: the
    final adapter is the uninterrupted run's, and the step count never goes back."""
    tmp, args, expected = cli_runs
    run = tmp / "killed"
    every = ["checkpoints.every=5", f"output_dir={run}", "resume=auto"]
    resumed_at = []
    for kill_after in (10, 25, 40):
        process = tuner([*args, *every], tmp / "home", tmp)
        wait_for(run / "checkpoints" / f"step-{kill_after:07d}" / "state.pt", process)
        time.sleep(0.05 * (kill_after % 7))  # somewhere in the steps after it
        process.send_signal(signal.SIGKILL)
        process.communicate()
        from tuner.training.checkpoint_files import find

        newest = find(run / "checkpoints")[-1]
        resumed_at.append(int(newest.name.split("-")[1]))
        state = torch.load(newest / "state.pt", weights_only=True)
        # the step count and the LR schedule's position agree in every checkpoint
        assert state["step"] == resumed_at[-1] == state["lr_scheduler"]["last_epoch"]
    assert resumed_at == sorted(resumed_at) and resumed_at[0] >= 10
    final = tuner([*args, *every], tmp / "home", tmp)
    out, err = final.communicate(timeout=600)
    assert final.returncode == 0, err[-3000:]
    assert f"resumed from {run / 'checkpoints'}" in out + err
    assert_same(adapter(run), expected)


@pytest.mark.e2e
def test_sigterm_saves_exits_zero_and_prints_the_resume_command(cli_runs):
    tmp, args, expected = cli_runs
    run = tmp / "termed"
    process = tuner([*args, f"output_dir={run}", "checkpoints.every=10"], tmp / "home", tmp)
    wait_for(run / "checkpoints" / "step-0000010" / "state.pt", process)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err[-3000:]
    assert "resume with:" in err and "resume=auto" in err and f"output_dir={run}" in err
    from tuner.training.checkpoint_files import find

    last = find(run / "checkpoints")[-1]
    assert int(last.name.split("-")[1]) >= 10 and not (run / "diffusers").exists()
    command = shlex.split(err.split("resume with:\n")[1].strip())
    assert command[:3] == ["python", "-m", "tuner"]
    again = tuner(command[3:], tmp / "home", tmp)
    out, err = again.communicate(timeout=600)
    assert again.returncode == 0, err[-3000:]
    assert_same(adapter(run), expected)


def test_resume_settings_are_checked_before_anything_loads(tmp_path, tiny_pipeline_dir):
    common = [f"model.path={tiny_pipeline_dir}", f"data.instance_dir={tmp_path}", "stages=[base,prepare,train,export]"]
    with pytest.raises(ConfigError, match="output_dir"):
        validate(compose("lora", [*common, "resume=auto"]))
    with pytest.raises(ConfigError, match="not a checkpoint"):
        validate(compose("lora", [*common, f"resume={tmp_path}"]))
    with pytest.raises(ConfigError, match="checkpoints.keep"):
        validate(compose("lora", [*common, "checkpoints.keep=0"]))


def checkpoint_bytes(folder: Path) -> dict:
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_nonfinite_loss_stops_naming_the_step_and_leaves_the_checkpoints(tmp_path, tiny_pipeline_dir):
    first = train_in_process(tmp_path, tiny_pipeline_dir, "train.max_steps=3", "checkpoints.every=1", name="nan")
    before = checkpoint_bytes(first.dir / "checkpoints")
    with pytest.raises(FloatingPointError, match="at step 4"):
        train_in_process(
            tmp_path,
            tiny_pipeline_dir,
            "train.max_steps=5",
            "checkpoints.every=1",
            "resume=auto",
            name="nan",
            unchecked={"train.input_perturbation": float("nan")},  # from step 4 on, every loss is NaN
        )
    assert checkpoint_bytes(first.dir / "checkpoints") == before  # nothing of the bad step was saved


def test_nonfinite_skip_goes_on_without_applying_those_steps(tmp_path, tiny_pipeline_dir):
    run = train_in_process(
        tmp_path,
        tiny_pipeline_dir,
        "train.max_steps=2",
        "train.nonfinite=skip",
        unchecked={"train.input_perturbation": float("nan")},
    )
    assert run.metrics["skipped_steps"] == 2
    lora_b = {k: v for k, v in adapter(run.dir).items() if "lora_B" in k}
    assert lora_b and all(torch.count_nonzero(v) == 0 for v in lora_b.values())  # as initialised: never updated


def test_a_failed_checkpoint_write_says_so_and_keeps_the_previous(tmp_path, tiny_pipeline_dir, monkeypatch):
    import safetensors.torch

    from tuner.training.checkpoints import SaveError

    real, calls = safetensors.torch.save_file, []

    def disk_full_on_the_second(tensors, path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real(tensors, path, *args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full_on_the_second)
    with pytest.raises(
        SaveError, match=r"step-0000002: No space left on device; the checkpoint .*step-0000001 is intact"
    ):
        train_in_process(tmp_path, tiny_pipeline_dir, "train.max_steps=3", "checkpoints.every=1")
    folder = tmp_path / "run" / "checkpoints"
    assert [p.name for p in folder.iterdir()] == ["step-0000001"]  # no half-written folder left behind
    assert load_file(folder / "step-0000001" / "trained.safetensors")


def test_an_output_folder_holding_a_run_is_not_written_over(tmp_path, tiny_pipeline_dir):
    first = train_in_process(tmp_path, tiny_pipeline_dir, "train.max_steps=1", name="taken")
    before = checkpoint_bytes(first.dir)
    with pytest.raises(ConfigError, match="holds another run"):
        train_in_process(tmp_path, tiny_pipeline_dir, "train.max_steps=1", name="taken")
    assert checkpoint_bytes(first.dir) == before  # refused before anything was written
    train_in_process(tmp_path, tiny_pipeline_dir, "train.max_steps=1", "overwrite=true", name="taken")
