"""Hostile configuration and processes: damaged peft configs, symbolic link loops, a part of a model where a whole
one goes, stage lists, values Hydra cannot read unquoted, the environment variables, and ranks that die or do not
come. Each gets one line naming the key, file or variable and the fix (exit 2 at config time, before any run
folder is made; exit 1 for a rank), no traceback, and no file of the user's changes (sha256 before and after).
"""

import contextlib
import itertools
import os
import re
import shlex
import shutil
import signal
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from safetensors.torch import save_file

from tests.helpers import ROOT, Launch, free_port, make_photos, run_tuner, train_in_process
from tests.test_hostile_files import cli, one_line, tree

pytestmark = pytest.mark.hostile  # the hostile-input corpus: pytest -m hostile


def refused(capsys, out: Path, *args: str) -> str:
    """The command is refused at config time: status 2, one line, no run folder (``out``) made."""
    code, err = cli(capsys, *args, f"output_dir={out}")
    line = one_line(err)
    assert code == 2, err
    assert line.startswith("tuner: config error: "), line
    assert not out.exists()
    return line


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_pipeline_dir):
    """A LoRA run on the tiny pipeline (U-Net and text encoder), exported as diffusers and peft files."""
    tmp = tmp_path_factory.mktemp("trained")
    return train_in_process(tmp, tiny_pipeline_dir, "text_encoder.train=lora", "export.formats=[diffusers,peft]").dir


@pytest.fixture
def photos(tmp_path):
    return make_photos(tmp_path / "photos")


# ---------------------------------------------------------------- 1. a damaged peft adapter_config.json

DAMAGE = {
    "not_json": ('{"peft_type": "LORA", r: 4', "not valid JSON"),
    "a_list": ('[{"peft_type": "LORA", "r": 4}]', "a JSON list, not an object"),
    "no_fields": ('{"peft_type": "LORA", "lora_alpha": 4}', "no target_modules, r in it"),
    "rank_zero": ('{"peft_type": "LORA", "r": 0, "target_modules": ["to_q"]}', "r=0"),
}


def inputs(tiny, photos, peft):
    """How a user hands a peft folder to tuner: each command and the key the refusal must name."""
    return {
        "evaluate": (["recipe=evaluate", f"model.path={tiny}", "model.builtin=null", f"data.instance_dir={photos}",
                      f"checkpoint={peft}"], "checkpoint"),
        "inspect": (["recipe=inspect", f"checkpoint={peft}"], "checkpoint"),
        "export": (["recipe=export", f"model.path={tiny}", f"checkpoint={peft}"], "checkpoint"),
        "generate": (["recipe=generate", f"model.path={tiny}", "generate.prompts=[a ball]",
                      f"generate.adapters=[{{path:{peft}}}]"], "generate.adapters[0].path"),
        "merge": (["recipe=lora_merge", f"model.path={tiny}", f"merge.inputs=[{{path:{peft}}}]"], "merge.inputs[0]"),
    }  # fmt: skip


@pytest.mark.parametrize("damage", list(DAMAGE))
@pytest.mark.parametrize("how", ["evaluate", "inspect", "export", "generate", "merge"])
def test_a_damaged_peft_adapter_config_is_refused_naming_the_key_and_the_file(
    capsys, trained, tiny_pipeline_dir, photos, tmp_path, damage, how
):
    peft = tmp_path / "peft"
    shutil.copytree(trained / "peft", peft)
    text, said = DAMAGE[damage]
    (peft / "unet" / "adapter_config.json").write_text(text)
    before = {"peft": tree(peft), "photos": tree(photos), "base": tree(tiny_pipeline_dir)}
    args, key = inputs(tiny_pipeline_dir, photos, peft)[how]
    line = refused(capsys, tmp_path / "run", *args)
    assert f"{key}: {peft / 'unet' / 'adapter_config.json'}: {said}" in line, line
    assert "export the adapter again" in line or "whole number" in line, line
    assert {"peft": tree(peft), "photos": tree(photos), "base": tree(tiny_pipeline_dir)} == before


def test_a_run_folder_whose_peft_export_is_what_loads_is_checked_too(capsys, trained, tiny_pipeline_dir, tmp_path):
    run = tmp_path / "theirs"
    shutil.copytree(trained, run)
    shutil.rmtree(run / "diffusers")  # so its peft/ export is what loads
    (run / "peft" / "text_encoder" / "adapter_config.json").write_text("[]")
    before = tree(run)
    line = refused(capsys, tmp_path / "run", "recipe=export", f"model.path={tiny_pipeline_dir}", f"checkpoint={run}")
    assert f"checkpoint: {run / 'peft' / 'text_encoder' / 'adapter_config.json'}: a JSON list" in line, line
    assert tree(run) == before


def test_the_intact_peft_export_passes_the_checks(trained, tiny_pipeline_dir, tmp_path):
    from tuner.checks import validate
    from tuner.compose import compose
    from tuner.export.reading import peft_config

    for component in ("unet", "text_encoder"):
        assert peft_config(trained / "peft" / component)["r"] == 8  # the lora recipe's adapter.rank
    for recipe, more in (("inspect", []), ("export", [f"model.path={tiny_pipeline_dir}"])):
        validate(compose(recipe, [f"checkpoint={trained / 'peft'}", f"output_dir={tmp_path / recipe}", *more]))


# ---------------------------------------------------------------- 2. symbolic link loops


@pytest.mark.parametrize(
    "key, link",
    [("checkpoint", "loop"), ("checkpoint", "loop/inside"), ("output_dir", "loop"), ("output_dir", "loop/run"),
     ("generate.adapters[0].path", "loop"), ("model.path", "loop")],
)  # fmt: skip
def test_a_symbolic_link_loop_is_refused_naming_its_key(capsys, tiny_pipeline_dir, tmp_path, key, link):
    links = tmp_path / "links"
    links.mkdir()
    (links / "loop").symlink_to("loop")  # ln -s loop loop
    (links / "a").symlink_to("b")  # and a loop of two
    (links / "b").symlink_to("a")
    path = links / link
    before, base = tree(links), tree(tiny_pipeline_dir)
    out = tmp_path / "run"
    args = {
        "checkpoint": ["recipe=inspect", f"checkpoint={path}", f"output_dir={out}"],
        "output_dir": ["recipe=generate", f"model.path={tiny_pipeline_dir}", "generate.prompts=[a]",
                       f"output_dir={path}"],
        "generate.adapters[0].path": ["recipe=generate", f"model.path={tiny_pipeline_dir}", "generate.prompts=[a]",
                                      f"generate.adapters=[{{path:{path}}}]", f"output_dir={out}"],
        "model.path": ["recipe=generate", f"model.path={path}", "generate.prompts=[a]", f"output_dir={out}"],
    }[key]  # fmt: skip
    code, err = cli(capsys, *args)
    line = one_line(err)
    assert code == 2 and line.startswith("tuner: config error: "), err
    assert f"{key}={path}: a symbolic link loop" in line and f"point {key} at a real" in line, line
    assert not out.exists()
    assert tree(links) == before and tree(tiny_pipeline_dir) == base
    code, err = cli(capsys, *[a.replace(str(path), str(links / "a")) for a in args])  # the two-link loop alike
    assert code == 2 and "a symbolic link loop" in one_line(err)


# ---------------------------------------------------------------- 3. a part of a model where a whole model goes


@pytest.fixture(scope="module")
def parts(tmp_path_factory, tiny_pipeline_dir, trained):
    """What a user may take for a model: a LoRA file and folder, a U-Net folder, its weights file, the U-Net of a
    single-file checkpoint alone; and a single file lacking its text encoder."""
    import transformers
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from tuner.models import get_family

    tmp = tmp_path_factory.mktemp("parts")
    base = tiny_pipeline_dir
    modules = {"unet": UNet2DConditionModel.from_pretrained(base / "unet"),
               "vae": AutoencoderKL.from_pretrained(base / "vae"),
               "text_encoder": transformers.CLIPTextModel.from_pretrained(base / "text_encoder")}  # fmt: skip
    vocab = {"text_encoder": modules["text_encoder"].config.vocab_size}
    state = {k: v.contiguous() for k, v in get_family("sd15").single_file_state(modules, vocab).items()}
    save_file({k: v for k, v in state.items() if k.startswith("model.diffusion_model.")}, tmp / "unet_only.safetensors")
    save_file({k: v for k, v in state.items() if not k.startswith("cond_stage_model.")}, tmp / "no_text.safetensors")
    return {
        "lora_file": (trained / "diffusers" / "pytorch_lora_weights.safetensors", "a LoRA (adapter) file"),
        "lora_folder": (trained / "diffusers", "a LoRA folder"),
        "peft_folder": (trained / "peft", "a peft adapter folder"),
        "unet_folder": (base / "unet", "a diffusers UNet2DConditionModel folder, one component of a pipeline"),
        "unet_weights": (base / "unet" / "diffusion_pytorch_model.safetensors", "a diffusers U-Net's weights alone"),
        "unet_single_file": (tmp / "unet_only.safetensors", "the U-Net's weights alone (model.diffusion_model.*"),
        "no_text": (tmp / "no_text.safetensors", None),
    }


@pytest.mark.parametrize("key", ["model.path", "extract.tuned"])
@pytest.mark.parametrize(
    "part", ["lora_file", "lora_folder", "peft_folder", "unet_folder", "unet_weights", "unet_single_file"]
)
def test_a_lora_or_a_bare_unet_where_a_model_goes_is_refused_saying_what_it_is(
    capsys, parts, tiny_pipeline_dir, trained, tmp_path, key, part
):
    path, what = parts[part]
    before = {"base": tree(tiny_pipeline_dir), "run": tree(trained), "parts": tree(Path(parts["no_text"][0]).parent)}
    if key == "model.path":
        args = ["recipe=generate", f"model.path={path}", "generate.prompts=[a]"]
        args += [f"model.config={tiny_pipeline_dir}"] if path.is_file() else []
    else:
        args = ["recipe=lora_extract", f"model.path={tiny_pipeline_dir}", f"extract.tuned={path}"]
    line = refused(capsys, tmp_path / "run", *args)
    assert f"{key}={path} is {what}" in line, line
    assert f"{key} takes" in line and "folder (with model_index.json) or a single-file .safetensors" in line, line
    if "LoRA" in what or "peft" in what:  # where it goes instead
        assert ("checkpoint=" if key == "model.path" else "recipe=lora_resize") in line, line
    assert {"base": tree(tiny_pipeline_dir), "run": tree(trained),
            "parts": tree(Path(parts["no_text"][0]).parent)} == before  # fmt: skip


def test_a_single_file_diffusers_cannot_read_whole_is_one_line_naming_the_key(
    capsys, parts, tiny_pipeline_dir, tmp_path
):
    path, _ = parts["no_text"]
    before = tree(path.parent)
    code, err = cli(capsys, "recipe=generate", f"model.path={path}", f"model.config={tiny_pipeline_dir}",
                    "generate.prompts=[a]", "generate.steps=1", f"output_dir={tmp_path / 'run'}")  # fmt: skip
    line = one_line(err)
    assert code == 2, err
    assert f"model.path={path}: diffusers cannot read it as a whole StableDiffusionPipeline" in line, line
    assert "CLIPTextModel" in line, line  # diffusers' own word on what is missing
    assert tree(path.parent) == before
    assert not (tmp_path / "run" / "images").exists()


# ---------------------------------------------------------------- 4. stages


@pytest.mark.parametrize(
    "stages, said",
    [
        ("[]", "stages=[] runs nothing: list the stages to run, e.g. stages=[base,prepare,train,export,gallery]"),
        ("[base,base,train]", "stages=[base,base,train]: base listed more than once; each stage runs once, "
                              "e.g. stages=[base,prepare,train]"),
        ("[base,prepare,train,train,export]", "train listed more than once; each stage runs once, "
                                              "e.g. stages=[base,prepare,train,export]"),
        ("[train,base,prepare]", "train needs base before it; e.g. stages=[base,prepare,train]"),
        ("[export,train,prepare,base]", "export needs base before it; e.g. stages=[base,prepare,train,export]"),
        ("[gallery]", "gallery needs base before it; e.g. stages=[base,prepare,train,gallery]"),
    ],
)  # fmt: skip
def test_empty_repeated_or_misordered_stages_are_refused_with_an_order_that_runs(
    capsys, tiny_pipeline_dir, photos, tmp_path, stages, said
):
    before = tree(photos)
    args = ("recipe=lora", f"model.path={tiny_pipeline_dir}", f"data.instance_dir={photos}",
            "data.instance_prompt=a photo of sks ball", f"stages={stages}")  # fmt: skip
    line = refused(capsys, tmp_path / "run", *args)
    assert said in line, line
    assert tree(photos) == before


def test_every_suggested_order_lists_each_stage_once_and_passes_the_check():
    from tuner.checks import _check_stages, stage_order
    from tuner.errors import ConfigError

    names = ["base", "prepare", "train", "export", "gallery"]
    tried = [list(p) for p in itertools.permutations(names)]
    tried += [["train"], ["gallery", "export"], ["evaluate", "load_adapter"], ["base", "base", "train", "train"],
              ["class_images", "generate"], ["evaluate"]]  # fmt: skip
    for stages in tried:
        order = stage_order(stages)
        assert len(order) == len(set(order)) and set(stages) <= set(order), (stages, order)
        _check_stages(OmegaConf.create({"stages": order, "recipe": "lora"}))
        try:  # and the refusal of a list in a wrong order says exactly that one
            _check_stages(OmegaConf.create({"stages": stages, "recipe": "lora"}))
        except ConfigError as e:
            assert f"e.g. stages=[{','.join(order)}]" in str(e), (stages, str(e))


# ---------------------------------------------------------------- 5. values Hydra reads as lists, sweeps or grammar

VALUES = [
    "a photo of sks dog, smiling",  # a comma: Hydra's "Ambiguous value"
    "sks, dog",
    "sks's dog, smiling",  # quoted the other way
    "a=b",
    "a photo of [sks] dog",
]


@pytest.mark.parametrize("value", VALUES)
def test_a_value_hydra_cannot_take_unquoted_keeps_its_quoting_hint_and_the_hint_works(capsys, tmp_path, value):
    from tuner.compose import compose

    line = refused(capsys, tmp_path / "run", "recipe=lora", f"data.instance_prompt={value}")
    assert f"data.instance_prompt={value}: Hydra" in line, line
    assert "quote" in line and "in a shell, quote the whole argument too" in line, line
    if "," in value and "'" not in value:  # "Ambiguous value": Hydra's other readings kept, a list, a sweep
        assert "data.instance_prompt=[value1,value2]" in line and "add -m" in line, line
    quoted = re.search(r"quote (?:it,|the value:) (data\.instance_prompt=(['\"]).*?\2) \(in a shell", line)
    assert quoted, line
    assert compose("lora", [quoted[1]]).data.instance_prompt == value  # what it says to write works
    shell = re.search(r"quote the whole argument too: (.*?)\)(?:;|$)", line)[1]
    assert shlex.split(shell) == [quoted[1]]  # and so does what it says to type in a shell


# ---------------------------------------------------------------- 6. TUNER_CONF_DIR, TUNER_RECIPES_DIR


@pytest.mark.parametrize(
    "variable, make, said",
    [
        ("TUNER_CONF_DIR", None, "no such folder"),
        ("TUNER_CONF_DIR", "empty", "no config.yaml in it"),
        ("TUNER_RECIPES_DIR", None, "no such folder"),
    ],
)
def test_a_config_folder_variable_naming_nothing_is_refused_naming_it(tmp_path, monkeypatch, variable, make, said):
    folder = tmp_path / "my-conf"
    if make:
        folder.mkdir()
        (folder / "notes.txt").write_text("mine")
    before = tree(tmp_path)
    monkeypatch.setenv(variable, str(folder))
    done = run_tuner("recipe=lora", "print_config", home=tmp_path / "home", cwd=tmp_path, timeout=120)
    line = one_line(done.stderr)
    assert done.returncode == 2, done.stderr
    assert f"{variable}={folder}: {said}" in line and "or unset it" in line, line
    assert str(ROOT / ("conf" if variable == "TUNER_CONF_DIR" else "recipes")) in line, line  # what it should be like
    assert tree(tmp_path) == before and not (tmp_path / "runs").exists()


# ---------------------------------------------------------------- 7. TUNER_BARRIER_TIMEOUT


@pytest.mark.parametrize("value", ["abc", "-5", "0", "nan", "inf", "1e999"])
def test_a_bad_barrier_timeout_is_refused_naming_the_variable(capsys, monkeypatch, tiny_pipeline_dir, tmp_path, value):
    monkeypatch.setenv("TUNER_BARRIER_TIMEOUT", value)
    line = refused(
        capsys, tmp_path / "run", "recipe=generate", f"model.path={tiny_pipeline_dir}", "generate.prompts=[a]"
    )
    assert f"TUNER_BARRIER_TIMEOUT={value}: the seconds a rank waits" in line and "a positive number" in line, line
    assert "default 7200" in line, line


def test_the_barrier_timeout_is_seconds_7200_unless_set_and_documented(monkeypatch):
    from tuner.distributed import barrier_timeout

    monkeypatch.delenv("TUNER_BARRIER_TIMEOUT", raising=False)
    assert barrier_timeout() == 7200
    monkeypatch.setenv("TUNER_BARRIER_TIMEOUT", "90.5")
    assert barrier_timeout() == 90.5
    readme = (ROOT / "README.md").read_text()
    assert re.search(r"`TUNER_BARRIER_TIMEOUT`[^\n]*7200", readme)


# ---------------------------------------------------------------- 8. a rank killed, a rank that does not come


def _worker_of(launcher: int) -> int:
    """The pid of the one worker a launcher (torchrun, one process per node) started."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == launcher:
            return int(stat.parent.name)
    raise AssertionError(f"no worker of launcher {launcher}")


@pytest.mark.e2e
@pytest.mark.parametrize("strategy, fault", [("fsdp", "killed"), ("ddp", "stopped")])
def test_a_rank_killed_or_not_coming_is_one_line_on_the_survivor(
    tiny_pipeline_dir, tmp_path, monkeypatch, strategy, fault
):
    """Two launchers (two simulated machines, one rank each), so that the survivor's own launcher does not end it
    first: rank 1 is SIGKILLed (under FSDP) or SIGSTOPped past TUNER_BARRIER_TIMEOUT (under DDP) mid-training."""
    photos = make_photos(tmp_path / "photos")
    before = tree(photos)
    monkeypatch.setenv("TUNER_BARRIER_TIMEOUT", "5")
    args = ["recipe=lora", f"model.path={tiny_pipeline_dir}", "data.resolution=16", f"data.instance_dir={photos}",
            "data.instance_prompt=a photo of sks ball", "train.max_steps=20000", "train.log_every=10000",
            "validation.every=0", "log.tensorboard=false", "stages=[base,prepare,train,export]",
            f"distributed.strategy={strategy}", f"output_dir={tmp_path / 'run'}"]  # fmt: skip
    port = free_port()
    launcher = ["--nnodes=2", "--nproc_per_node=1", "--master_addr=127.0.0.1", f"--master_port={port}"]
    nodes = [Launch([*launcher, f"--node_rank={r}"], args, tmp_path, f"node{r}") for r in (0, 1)]
    deadline = time.time() + 240
    while "/20000" not in nodes[0].text:  # rank 0's progress bar: training is under way
        assert nodes[0].process.poll() is None and nodes[1].process.poll() is None, nodes[0].text[-3000:]
        assert time.time() < deadline, nodes[0].text[-3000:]
        time.sleep(0.1)
    victim = _worker_of(nodes[1].process.pid)
    os.kill(victim, signal.SIGKILL if fault == "killed" else signal.SIGSTOP)
    started = time.time()
    try:
        code = nodes[0].wait(timeout=120)
    finally:
        waited = time.time() - started
        with contextlib.suppress(ProcessLookupError):
            os.kill(victim, signal.SIGKILL)  # stopped: it never goes on
        for node in nodes:
            if node.process.poll() is None and node.process.wait(timeout=60) is None:
                node.process.kill()
    text = nodes[0].text
    ours = [line for line in text.splitlines() if line.startswith("tuner:")]
    assert code != 0, text[-3000:]
    assert len(ours) == 1, text[-3000:]
    if fault == "killed":
        said = "rank 1 stopped (killed or crashed) while this rank waited for it; see its log; exit 1"
        assert ours[0] == f"tuner: rank 0: {said}", ours
    else:
        assert ours[0].startswith("tuner: rank 0: rank 1 did not reach the barrier within TUNER_BARRIER_TIMEOUT=5 s")
        assert waited >= 4, waited  # it waited the timeout, not less
    # no traceback of tuner's (the launcher's own summary of its worker's exit follows it, as for any failure)
    assert "[rank0]:" not in text and "tuner/__main__.py" not in text and "gloo" not in text, text[-3000:]
    assert tree(photos) == before
