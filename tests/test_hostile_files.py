"""Hostile files and foreign folders: each gets one line naming the file or key (exit 2), or a refusal before
anything runs, and no file of the user's changes (sha256 of the folders before and after).

The corpus is built here: damaged, pickled, misshapen and non-finite adapter and embedding files made from a
real exported LoRA, and folders that tuner did not write (a dataset, a model, someone else's run).
"""

import hashlib
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tests.helpers import ROOT, make_photos, train_in_process
from tuner.__main__ import main

pytestmark = pytest.mark.hostile  # the hostile-input corpus: pytest -m hostile


def tree(folder: Path) -> dict[str, str]:
    """sha256 (and mode) of every file under ``folder``, by relative path; a link by where it points."""
    out = {}
    for path in sorted(Path(folder).rglob("*")):
        if path.is_symlink():
            out[str(path.relative_to(folder))] = f"-> {os.readlink(path)}"
        elif path.is_file():
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            out[str(path.relative_to(folder))] = f"{digest} {oct(path.stat().st_mode & 0o777)}"
    return out


def cli(capsys, *args: str) -> tuple[int, str]:
    """``python -m tuner ARGS`` in this process: the exit code and what it printed on stderr."""
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    capsys.readouterr()
    code = main(list(args))
    return code, capsys.readouterr().err


def one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("tuner:")]
    assert "Traceback" not in err, err
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_pipeline_dir):
    """A LoRA run on the tiny pipeline (U-Net and text encoder), exported as diffusers, kohya and peft files."""
    tmp = tmp_path_factory.mktemp("trained")
    run = train_in_process(
        tmp,
        tiny_pipeline_dir,
        "text_encoder.train=lora",
        "checkpoints.every=2",
        "export.formats=[diffusers,kohya,peft]",
    )
    return run.dir


@pytest.fixture
def user(tmp_path):
    """A user's folders: photos, and a folder of someone else's things (images/, config.yaml, README.md)."""
    photos = make_photos(tmp_path / "photos")
    theirs = tmp_path / "theirs"
    (theirs / "images").mkdir(parents=True)
    (theirs / "images" / "holiday.png").write_bytes(b"not really a png")
    (theirs / "config.yaml").write_text("mine: true\n")
    (theirs / "README.md").write_text("# my project\n")
    return photos, theirs


def generate_args(tiny, *more):
    return ("recipe=generate", f"model.path={tiny}", "data.resolution=16", "generate.prompts=[a ball]",
            "generate.steps=2", *more)  # fmt: skip


# ---------------------------------------------------------------- folders tuner did not write


@pytest.mark.parametrize("overwrite", [False, True])
def test_generate_into_a_foreign_folder_is_refused_and_nothing_changes(capsys, tiny_pipeline_dir, user, overwrite):
    _, theirs = user
    before = tree(theirs)
    code, err = cli(capsys, *generate_args(tiny_pipeline_dir, f"output_dir={theirs}", f"overwrite={overwrite}"))
    line = one_line(err)
    assert code == 2 and str(theirs) in line and "did not write" in line and "config.yaml" in line
    assert tree(theirs) == before


def test_output_dir_in_the_instance_folder_or_the_base_is_refused(capsys, tiny_pipeline_dir, user):
    photos, _ = user
    common = ("recipe=lora", f"model.path={tiny_pipeline_dir}", "data.resolution=16", f"data.instance_dir={photos}",
              "data.instance_prompt=a photo of sks ball")  # fmt: skip
    for folder, key in [
        (photos, "data.instance_dir"),
        (photos / "run", "data.instance_dir"),
        (tiny_pipeline_dir, "model.path"),
        (tiny_pipeline_dir / "runs" / "x", "model.path"),
    ]:
        before = {"photos": tree(photos), "base": tree(tiny_pipeline_dir)}
        code, err = cli(capsys, *common, f"output_dir={folder}")
        line = one_line(err)
        assert code == 2 and key in line and str(folder) in line, line
        assert {"photos": tree(photos), "base": tree(tiny_pipeline_dir)} == before
        assert not (photos / "run").exists() and not (tiny_pipeline_dir / "runs").exists()


def test_output_dir_that_is_a_file_or_a_model_folder_is_refused_by_what_it_is(capsys, tiny_pipeline_dir, tmp_path):
    file = tmp_path / "notes.txt"
    file.write_text("x")
    code, err = cli(capsys, *generate_args(tiny_pipeline_dir, f"output_dir={file}"))
    assert code == 2 and "is a file" in one_line(err)
    model = tmp_path / "model"
    shutil.copytree(tiny_pipeline_dir, model)
    code, err = cli(capsys, "recipe=generate", f"model.path={tiny_pipeline_dir}", "generate.prompts=[a]",
                    f"output_dir={model}", "overwrite=true")  # fmt: skip
    assert code == 2 and "a diffusers model folder" in one_line(err)
    assert tree(model) == tree(tiny_pipeline_dir)


def test_a_sweep_into_a_foreign_folder_is_refused(capsys, tiny_pipeline_dir, user):
    _, theirs = user
    before = tree(theirs)
    code, err = cli(capsys, "-m", *generate_args(tiny_pipeline_dir, "generate.seed=1,2", f"output_dir={theirs}"))
    assert code == 2 and "did not write" in one_line(err)
    assert tree(theirs) == before


def test_overwrite_clears_the_previous_runs_outputs_and_keeps_what_a_person_added(
    capsys, tiny_pipeline_dir, trained, tmp_path
):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    (run / "notes.txt").write_text("my notes on this run")
    assert (run / "checkpoints").is_dir() and (run / "kohya").is_dir()
    code, err = cli(capsys, *generate_args(tiny_pipeline_dir, f"output_dir={run}"))  # without overwrite: refused
    assert code == 2 and "holds another run" in one_line(err)
    code, err = cli(capsys, *generate_args(tiny_pipeline_dir, f"output_dir={run}", "overwrite=true"))
    assert code == 0, err
    left = sorted(p.name for p in run.iterdir())
    assert left == ["config.yaml", "images", "notes.txt", "summary.json", "tuner-run.json"]
    assert (run / "notes.txt").read_text() == "my notes on this run"


def test_a_person_s_folder_where_the_run_would_write_is_refused(capsys, tiny_pipeline_dir, trained, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    (run / "images").mkdir()
    (run / "images" / "mine.png").write_bytes(b"x")
    before = tree(run)
    code, err = cli(capsys, *generate_args(tiny_pipeline_dir, f"output_dir={run}", "overwrite=true"))
    line = one_line(err)
    assert code == 2 and "images" in line and "not written by tuner" in line
    assert tree(run) == before


def test_exported_files_have_the_users_usual_mode(trained):
    mask = os.umask(0)
    os.umask(mask)
    modes = {path: oct(path.stat().st_mode & 0o777) for path in trained.rglob("*") if path.is_file()}
    assert modes and set(modes.values()) == {oct(0o666 & ~mask)}, modes


# ---------------------------------------------------------------- hostile adapter and embedding files


def _header_json(data: bytes) -> tuple[int, bytes]:
    n = struct.unpack("<Q", data[:8])[0]
    return n, data[8 : 8 + n]


def _with_header(data: bytes, header: bytes) -> bytes:
    n, _ = _header_json(data)
    return struct.pack("<Q", len(header)) + header + data[8 + n :]


def corpus(trained: Path, folder: Path) -> dict[str, tuple[Path, str]]:
    """Hostile files made from the run's real exports: name -> (file or folder, what the error must name)."""
    import json

    folder.mkdir()
    diffusers = trained / "diffusers" / "pytorch_lora_weights.safetensors"
    kohya = next((trained / "kohya").glob("*.safetensors"))
    good, cases = diffusers.read_bytes(), {}
    with safe_open(diffusers, "pt") as f:
        meta = f.metadata()
    state, kstate = load_file(diffusers), load_file(kohya)

    def raw(name: str, data: bytes, names: str = "") -> None:
        (folder / name).write_bytes(data)
        cases[name] = (folder / name, names or name)

    def tensors(name: str, values: dict, names: str, metadata=None) -> None:
        save_file(values, folder / name, metadata=metadata)
        cases[name] = (folder / name, names)

    unreadable = "not a readable safetensors file"
    raw("truncated.safetensors", good[: len(good) // 2], unreadable)
    raw("empty.safetensors", b"", unreadable)
    raw("huge_header.safetensors", struct.pack("<Q", 2**40) + good[8:], "header too large")
    raw("bad_header.safetensors", _with_header(good, b'{"a": [1, 2'), unreadable)
    header = json.loads(_header_json(good)[1])
    key = next(k for k in header if k != "__metadata__")
    header[key]["data_offsets"] = [0, 10**9]
    raw("offsets.safetensors", _with_header(good, json.dumps(header).encode()), unreadable)
    empty_header = b'{"__metadata__": {"a": "b"}}'
    raw("no_tensors.safetensors", struct.pack("<Q", len(empty_header)) + empty_header, "no tensors")
    nan = dict(state)
    nan[key] = torch.full_like(nan[key], float("nan"))
    tensors("nan.safetensors", nan, key, meta)
    inf_alpha = dict(kstate)
    alpha = next(k for k in kstate if k.endswith(".alpha"))
    inf_alpha[alpha] = torch.tensor(float("inf"))
    tensors("kohya_inf_alpha.safetensors", inf_alpha, alpha)
    up = next(k for k in kstate if k.endswith(".lora_up.weight"))
    tensors("kohya_no_up.safetensors", {k: v for k, v in kstate.items() if k != up}, up)
    down = up.replace("lora_up", "lora_down")
    ranks = dict(kstate)
    ranks[down] = ranks[down][:-1].clone()
    tensors("kohya_ranks.safetensors", ranks, down.removesuffix(".lora_down.weight"))
    a_key = next(k for k in state if k.endswith("to_q.lora_A.weight") and k.startswith("unet."))
    wide = dict(state)
    wide[a_key] = torch.zeros(wide[a_key].shape[0], wide[a_key].shape[1] + 3)
    tensors("wrong_width.safetensors", wide, "does not load as a LoRA", meta)
    tensors("bad_metadata.safetensors", state, "lora_adapter_metadata", {**meta, "lora_adapter_metadata": "{nope"})
    foreign = {k.replace("unet.down_blocks.0.", "unet.down_blocks.7."): v for k, v in state.items()}
    tensors("other_model.safetensors", foreign, "down_blocks.7", meta)
    torch.save(state, folder / "pickled.pt")
    cases["pickled.pt"] = (folder / "pickled.pt", "pickle")
    torch.save(state, folder / "pytorch_lora_weights.bin", _use_new_zipfile_serialization=False)
    cases["pickled.bin"] = (folder / "pytorch_lora_weights.bin", "pickle")
    peft = folder / "peft_bin"
    shutil.copytree(trained / "peft", peft)
    for component in ("unet", "text_encoder"):
        weights = peft / component / "adapter_model.safetensors"
        torch.save(load_file(weights), peft / component / "adapter_model.bin")
        weights.unlink()
    cases["peft_bin"] = (peft, "adapter_model.bin")
    tensors("embedding_wide.safetensors", {"<emb>": torch.zeros(2, 1000)}, "<emb>")
    return cases


@pytest.fixture(scope="module")
def hostile(trained, tmp_path_factory):
    return corpus(trained, tmp_path_factory.mktemp("hostile") / "files")


CASES = [
    "truncated.safetensors", "empty.safetensors", "huge_header.safetensors", "bad_header.safetensors",
    "offsets.safetensors", "no_tensors.safetensors", "nan.safetensors", "kohya_inf_alpha.safetensors",
    "kohya_no_up.safetensors", "kohya_ranks.safetensors", "wrong_width.safetensors", "bad_metadata.safetensors",
    "other_model.safetensors", "pickled.pt", "pickled.bin", "peft_bin", "embedding_wide.safetensors",
]  # fmt: skip


@pytest.mark.parametrize("case", CASES)
def test_hostile_adapter_files_are_refused_by_name(capsys, case, hostile, tiny_pipeline_dir, tmp_path):
    path, names = hostile[case]
    before = tree(path.parent)
    out = tmp_path / "out"
    code, err = cli(capsys, "recipe=export", f"model.path={tiny_pipeline_dir}", f"checkpoint={path}",
                    "export.formats=[peft,merged]", f"output_dir={out}")  # fmt: skip
    line = one_line(err)
    assert code == 2, err
    assert str(path.name) in line and names in line, line
    assert "weights_only=False" not in line
    assert tree(path.parent) == before
    assert not (out / "peft").exists() and not (out / "merged").exists()


@pytest.mark.parametrize("case", ["other_model.safetensors", "pickled.pt", "truncated.safetensors"])
def test_generate_refuses_hostile_adapters_the_same_way(capsys, case, hostile, tiny_pipeline_dir, tmp_path):
    path, names = hostile[case]
    code, err = cli(capsys, *generate_args(tiny_pipeline_dir, f"generate.adapters=[{{path:{path}}}]",
                                           f"output_dir={tmp_path / 'out'}"))  # fmt: skip
    line = one_line(err)
    assert code == 2 and path.name in line and names in line, line
    assert not (tmp_path / "out" / "images").exists()


def test_a_safetensors_file_named_bin_loads(capsys, trained, tiny_pipeline_dir, tmp_path):
    file = tmp_path / "lora.bin"
    shutil.copy(trained / "diffusers" / "pytorch_lora_weights.safetensors", file)
    code, err = cli(capsys, "recipe=export", f"model.path={tiny_pipeline_dir}", f"checkpoint={file}",
                    "export.formats=[kohya]", f"output_dir={tmp_path / 'out'}")  # fmt: skip
    assert code == 0, err
    theirs = load_file(next((trained / "kohya").glob("*.safetensors")))
    ours = load_file(next((tmp_path / "out" / "kohya").glob("*.safetensors")))
    assert ours.keys() == theirs.keys()  # every module landed, the text encoder's too


def test_a_diverged_adapter_is_not_exported(trained, tiny_pipeline_dir, tmp_path):
    from tuner.checks import validate
    from tuner.compose import compose
    from tuner.errors import ConfigError
    from tuner.runner import entries, run_stage
    from tuner.stages.context import Run

    AcceleratorState._reset_state(True)
    cfg = compose("export", [f"model.path={tiny_pipeline_dir}", f"checkpoint={trained}", f"output_dir={tmp_path / 'o'}",
                             "export.formats=[diffusers,kohya]", "stages=[base,load_adapter,export]"])  # fmt: skip
    validate(cfg)
    run = Run(cfg, entries(cfg))
    run_stage(run, "base")
    run_stage(run, "load_adapter")
    with torch.no_grad():
        layer = next(m for n, m in run.components.unet.named_modules() if n.endswith("to_q") and hasattr(m, "lora_B"))
        next(iter(layer.lora_B.values())).weight[0, 0] = float("nan")
    with pytest.raises(ConfigError, match=r"unet\..*to_q.*lora_B.* NaN or infinite"):
        run_stage(run, "export")
    assert not (run.dir / "diffusers").exists() and not (run.dir / "kohya").exists()


# ---------------------------------------------------------------- faults: full disk, killed, unwritable home


def _limit_file_size():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG, like a full disk
    import resource

    resource.setrlimit(resource.RLIMIT_FSIZE, (60_000, 60_000))


def _tuner(*args, home, cwd, **kw):
    env = {**os.environ, "TUNER_HOME": str(home), "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "tuner", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300, **kw)  # fmt: skip


@pytest.mark.e2e
def test_a_full_disk_during_export_is_one_line_and_leaves_no_half_file(trained, tmp_path):
    before = tree(trained)
    out = tmp_path / "out"
    r = _tuner("recipe=export", f"checkpoint={trained}", "export.formats=[merged]", f"output_dir={out}",
               home=tmp_path, cwd=tmp_path, preexec_fn=_limit_file_size)  # fmt: skip
    line = one_line(r.stderr)
    assert r.returncode == 1 and f"{out / 'merged'}" in line and "File too large" in line, line
    assert tree(trained) == before
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "tuner-run.json"]


def test_an_unwritable_tuner_home_is_one_line(tmp_path):
    blocker = tmp_path / "home"
    blocker.write_text("a file where TUNER_HOME's folder should be")
    r = _tuner("recipe=digits_base", f"output_dir={tmp_path / 'out'}", home=blocker / "tuner", cwd=tmp_path)
    line = one_line(r.stderr)
    assert r.returncode == 1 and str(blocker / "tuner") in line and "Not a directory" in line, line


@pytest.mark.e2e
def test_the_same_command_finishes_an_export_killed_midway(trained, tmp_path):
    out = tmp_path / "out"
    command = ("recipe=export", f"checkpoint={trained}", "export.formats=[diffusers,kohya,peft,merged]",
               f"output_dir={out}")  # fmt: skip
    env = {**os.environ, "TUNER_HOME": str(tmp_path), "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen([sys.executable, "-m", "tuner", *command], cwd=tmp_path, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.time() + 120
    exporting = re.compile(r"\.(diffusers|kohya|peft|merged)\..*\.tmp")  # a format half written
    while time.time() < deadline and not (out.is_dir() and any(exporting.fullmatch(p.name) for p in out.iterdir())):
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert any(exporting.fullmatch(p.name) for p in out.iterdir()), "the kill came too late to test anything"
    r = _tuner(*command, home=tmp_path, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert re.search(r"removed \d+ temporary file", r.stdout), r.stdout
    names = sorted(p.name for p in out.iterdir())
    assert names == [
        "README.md",
        "config.yaml",
        "diffusers",
        "kohya",
        "merged",
        "peft",
        "summary.json",
        "tuner-run.json",
    ]
    r = _tuner(*command, home=tmp_path, cwd=tmp_path)  # finished now: the same command again is another run
    assert r.returncode == 2 and "holds another run" in r.stderr
