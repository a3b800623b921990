"""A run folder's own files are data, never orders: names read from a manifest, ``validation/steps.json`` or the
cache decide nothing that is deleted outside what tuner wrote, and links are never followed out of a folder tuner
deletes in.

The names themselves are checked here in this process (fast tier); the runs that read them (overwrite, resume,
prepare again, cache eviction) go through ``python -m tuner``'s ``main`` in the hostile tier, each asserting the
one line it prints, its exit code, and the sha256 of every file outside the run folder before and after.
"""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tests.helpers import make_photos, train_in_process
from tests.test_hostile_files import cli, generate_args, one_line, tree
from tuner.errors import ConfigError
from tuner.export.validation import ValidationGallery, read_steps
from tuner.files import inside
from tuner.run_folder import MANIFEST, read_manifest
from tuner.training.cache import MARKER, Store, check_cache_dir, evict, is_shard

LATENTS = "latents-" + "1" * 32


# ---------------------------------------------------------------- names read from files (fast tier)


@pytest.mark.parametrize("name", ["../victim", "..", ".", "", "/etc", "a/../../b", "a//b", "a/", "x\x00y", 3, None])
def test_a_name_that_is_not_plain_makes_its_file_damaged(tmp_path, name):
    with pytest.raises(ConfigError, match=r"index\.json is damaged: it names"):
        inside(tmp_path, name, tmp_path / "index.json")


def test_a_name_through_a_link_is_refused_and_a_plain_one_is_its_path(tmp_path):
    (tmp_path / "outside").mkdir()
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "cells").symlink_to(tmp_path / "outside")
    with pytest.raises(ConfigError, match=r"run/cells is a link"):
        inside(tmp_path / "run", "cells/a.png", tmp_path / "run" / "steps.json")
    assert inside(tmp_path / "run", "grid/a.png", "x") == tmp_path / "run" / "grid" / "a.png"


@pytest.mark.parametrize("entry", ["../victim", "..", ".", "/abs", "data/x", "notes"])
def test_a_manifest_listing_anything_but_tuners_own_entries_is_damaged(tmp_path, entry):
    (tmp_path / MANIFEST).write_text(json.dumps({"recipe": "lora", "entries": ["config.yaml", entry]}))
    with pytest.raises(ConfigError, match=rf"{MANIFEST}.* (is damaged|names)"):
        read_manifest(tmp_path, known={"data", "gallery"})
    (tmp_path / MANIFEST).write_text(json.dumps({"recipe": "lora", "entries": ["config.yaml", "data"]}))
    assert read_manifest(tmp_path, known={"data", "gallery"})["entries"] == ["config.yaml", "data"]


def test_validation_steps_name_their_files_by_step_never_by_what_the_record_says(tmp_path):
    """A resumed run deletes the files of the steps it samples again: the names come from the step number."""
    victim = tmp_path / "victim.png"
    victim.write_bytes(b"a user's picture")
    folder = tmp_path / "run" / "validation"
    gallery = ValidationGallery(folder, ["a"], [0])
    for step in (0, 2):
        gallery.add(step, torch.zeros(1, 3, 8, 8))
    record = json.loads((folder / "steps.json").read_text())
    record["steps"][1]["grid"] = "../../victim.png"
    record["steps"][1]["cells"] = [["../../victim.png"]]
    (folder / "steps.json").write_text(json.dumps(record))
    resumed = ValidationGallery(folder, ["a"], [0])
    assert resumed.steps == [0, 2]
    resumed.add(1, torch.zeros(1, 3, 8, 8))  # samples from step 1 again: step 2's files go
    assert victim.read_bytes() == b"a user's picture"
    assert not (folder / "step_000002.png").exists() and (folder / "step_000001.png").exists()
    for damaged in ["{not json", '{"prompts": ["a"], "seeds": [0], "steps": [{"step": "../x"}]}', "[]"]:
        (folder / "steps.json").write_text(damaged)
        with pytest.raises(ConfigError, match=r"steps\.json is damaged"):
            read_steps(folder / "steps.json")


def _tuner_shard(store: Store, seed: int) -> Path:
    torch.manual_seed(seed)
    return store.write({f"k{seed}": {"mean": torch.randn(4, 2, 2)}})


def _foreign(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"w": torch.ones(3)}, str(path))  # a real safetensors file, not tuner's shard
    return path


def test_eviction_deletes_only_files_that_carry_a_shards_header_in_an_encoders_folder(tmp_path):
    store = Store(tmp_path, LATENTS)
    ours = [_tuner_shard(store, seed) for seed in range(2)]
    theirs = [
        _foreign(tmp_path / "loras" / f"{'a' * 32}.safetensors"),  # a user's LoRA beside the encoders' folders
        _foreign(tmp_path / LATENTS / f"{'b' * 32}.safetensors"),  # a shard's name, not a shard's header
    ]
    (tmp_path / LATENTS / f"{'c' * 32}.safetensors").mkdir()  # a folder of a shard's name
    (tmp_path / LATENTS / f"{'d' * 32}.safetensors").symlink_to(theirs[0])
    before = {p: p.read_bytes() for p in theirs}
    assert [is_shard(p) for p in [*ours, *theirs]] == [True, True, False, False]
    removed = evict(tmp_path, max_gb=0, keep={ours[1]})
    assert removed == [ours[0]]
    assert {p: p.read_bytes() for p in theirs} == before and (tmp_path / LATENTS / f"{'c' * 32}.safetensors").is_dir()
    assert Store(tmp_path, LATENTS).index().keys() == {"k1"}  # the foreign file is not read, and stays
    assert theirs[1].exists()


def test_a_cache_folder_tuner_did_not_make_is_refused_unless_new_empty_or_marked(tmp_path):
    check_cache_dir(tmp_path / "new", "cache.dir=new")
    (tmp_path / "empty").mkdir()
    check_cache_dir(tmp_path / "empty", "cache.dir=empty")
    _tuner_shard(Store(tmp_path / "old", LATENTS), 0)
    assert (tmp_path / "old" / MARKER).is_file()  # writing a shard marks the folder
    (tmp_path / "old" / MARKER).unlink()  # a cache written before the marker: encoders' folders only
    check_cache_dir(tmp_path / "old", "cache.dir=old")
    _foreign(tmp_path / "mine" / "loras" / f"{'a' * 32}.safetensors")
    with pytest.raises(ConfigError, match=r"cache.dir=mine: .* holds files tuner did not write \(loras\)"):
        check_cache_dir(tmp_path / "mine", "cache.dir=mine")
    (tmp_path / "mine" / MARKER).write_text("{}")  # tuner's cache, where a person added a folder
    check_cache_dir(tmp_path / "mine", "cache.dir=mine")


# ---------------------------------------------------------------- through python -m tuner (hostile tier)


@pytest.fixture
def around(tmp_path):
    """A user's folder beside the run folder (``victim``), and a run folder of tuner's with a person's notes."""
    victim = tmp_path / "victim"
    (victim / "deep").mkdir(parents=True)
    (victim / "photo.png").write_bytes(b"precious")
    (victim / "deep" / "notes.json").write_text('{"mine": true}')
    run = tmp_path / "runs" / "run"
    run.mkdir(parents=True)
    (run / "notes.txt").write_text("my notes")
    (tmp_path / "runs" / "other-run").mkdir()
    (tmp_path / "runs" / "other-run" / "adapter.safetensors").write_bytes(b"another run's file")
    return tmp_path, victim, run


@pytest.mark.hostile
@pytest.mark.parametrize("entry", ["../../victim", "..", "ABSOLUTE", ".", "notes.txt", "../other-run"])
def test_overwrite_deletes_nothing_a_damaged_manifest_names(capsys, tiny_pipeline_dir, around, entry):
    root, victim, run = around
    entry = str(victim) if entry == "ABSOLUTE" else entry
    manifest = {"tuner": "0.1.0", "recipe": "generate", "finished": True, "entries": ["config.yaml", entry]}
    (run / MANIFEST).write_text(json.dumps(manifest))
    (run / "config.yaml").write_text("recipe: generate\n")
    before = tree(root)
    code, err = cli(capsys, *generate_args(tiny_pipeline_dir, f"output_dir={run}", "overwrite=true"))
    line = one_line(err)
    assert code == 2 and f"{run / MANIFEST}" in line and repr(entry) in line, line
    assert tree(root) == before


@pytest.mark.hostile
def test_a_listed_entry_that_is_a_link_is_refused_and_what_it_points_to_stays(capsys, tiny_pipeline_dir, around):
    root, victim, run = around
    manifest = {"tuner": "0.1.0", "recipe": "generate", "finished": True, "entries": ["config.yaml", "gallery"]}
    (run / MANIFEST).write_text(json.dumps(manifest))
    (run / "config.yaml").write_text("recipe: generate\n")
    (run / "gallery").symlink_to(victim)
    before = tree(root)
    code, err = cli(capsys, *generate_args(tiny_pipeline_dir, f"output_dir={run}", "overwrite=true"))
    line = one_line(err)
    assert code == 2 and f"{run / 'gallery'} is a link" in line, line
    assert tree(root) == before and (run / "gallery").is_symlink()


@pytest.mark.hostile
def test_resume_deletes_only_the_files_of_the_steps_it_samples_again(capsys, tiny_pipeline_dir, around):
    root, victim, _ = around
    settings = ("train.max_steps=4", "validation.every=2", "checkpoints.every=2", "validation.seeds=[0]",
                "validation.steps=2", "export.formats=[diffusers]")  # fmt: skip
    train_in_process(root, tiny_pipeline_dir, *settings)
    run = root / "run"
    (run / "checkpoints" / "step-0000004").rename(root / "step_4")  # as if killed after step 4's samples
    record = json.loads((run / "validation" / "steps.json").read_text())
    assert [e["step"] for e in record["steps"]] == [0, 2, 4]
    record["steps"][2]["grid"] = str(victim / "photo.png")
    record["steps"][2]["cells"] = [["../../victim/photo.png"] * len(r) for r in record["steps"][2]["cells"]]
    (run / "validation" / "steps.json").write_text(json.dumps(record))
    manifest = json.loads((run / MANIFEST).read_text())
    (run / MANIFEST).write_text(json.dumps({**manifest, "finished": False}))
    before = tree(victim)
    args = [f"model.path={tiny_pipeline_dir}", "data.resolution=16", f"data.instance_dir={root / 'photos'}",
            "data.instance_prompt=a photo of sks ball", "train.batch_size=2", "train.learning_rate=1e-2",
            "log.tensorboard=false", "stages=[base,prepare,train,export]", *settings]  # fmt: skip
    code, err = cli(capsys, "recipe=lora", *args, f"output_dir={run}", "resume=auto")
    assert code == 0, err
    assert tree(victim) == before
    assert [e["step"] for e in json.loads((run / "validation" / "steps.json").read_text())["steps"]] == [0, 2, 4]
    (run / "validation" / "steps.json").write_text('{"prompts": 1}')  # damaged: refused, naming it
    (run / "checkpoints" / "step-0000004").rename(root / "step_4b")
    code, err = cli(capsys, "recipe=lora", *args, f"output_dir={run}", "resume=auto")
    line = one_line(err)
    assert code == 2 and f"{run / 'validation' / 'steps.json'} is damaged" in line, line
    assert tree(victim) == before


@pytest.mark.hostile
def test_prepare_again_never_sweeps_through_a_linked_cache_and_keeps_files_it_did_not_name(
    capsys, tiny_pipeline_dir, around
):
    root, victim, _ = around
    photos = make_photos(root / "photos")
    args = ["recipe=lora", f"model.path={tiny_pipeline_dir}", "data.resolution=16", f"data.instance_dir={photos}",
            "data.instance_prompt=a photo of sks ball", "stages=[base,prepare]",
            f"output_dir={root / 'run'}"]  # fmt: skip
    code, err = cli(capsys, *args)
    assert code == 0, err
    data = root / "run" / "data" / "instance"

    def again():  # the same command into its own unfinished run, as after a kill during prepare
        manifest = json.loads((root / "run" / MANIFEST).read_text())
        (root / "run" / MANIFEST).write_text(json.dumps({**manifest, "finished": False}))
        (data / "fingerprint").unlink(missing_ok=True)
        return cli(capsys, *args)

    (data / "cache" / "mine.json").write_text("{}")  # not a name tuner gives a processed image
    code, err = again()
    assert code == 0, err
    assert (data / "cache" / "mine.json").read_text() == "{}"
    shutil.rmtree(data / "cache")
    (data / "cache").symlink_to(victim / "deep")
    before = tree(victim)
    code, err = again()
    line = one_line(err)
    assert code == 2 and f"{data / 'cache'} is a link" in line, line
    assert tree(victim) == before


@pytest.mark.hostile
def test_cache_eviction_and_cache_dir_never_touch_a_users_files(capsys, tiny_pipeline_dir, around):
    root, victim, _ = around
    photos = make_photos(root / "photos")
    lora = _foreign(victim / "loras" / f"{'a' * 32}.safetensors")
    common = ("recipe=lora", f"model.path={tiny_pipeline_dir}", "data.resolution=16", f"data.instance_dir={photos}",
              "data.instance_prompt=a photo of sks ball", "train.max_steps=1", "validation.every=0",
              "log.tensorboard=false", "export.formats=[diffusers]")  # fmt: skip
    before = tree(root)
    code, err = cli(capsys, *common, f"cache.dir={victim}", f"output_dir={root / 'a'}")
    line = one_line(err)
    assert code == 2 and f"cache.dir={victim}" in line and "holds files tuner did not write" in line, line
    code, err = cli(capsys, *common, f"cache.dir={photos / 'cache'}", f"output_dir={root / 'b'}")
    line = one_line(err)
    assert code == 2 and "cache.dir=" in line and f"data.instance_dir={photos}" in line, line
    assert tree(root) == before and not (root / "a").exists() and not (root / "b").exists()
    cache = root / "cache"
    code, err = cli(capsys, *common, f"cache.dir={cache}", f"output_dir={root / 'c'}")
    assert code == 0, err
    assert (cache / MARKER).is_file()
    [store] = [p for p in cache.iterdir() if p.name.startswith("latents-")]
    stale = _tuner_shard(Store(cache, store.name), 7)  # an old entry of tuner's: evicted
    planted = [
        _foreign(cache / "loras" / f"{'a' * 32}.safetensors"),
        _foreign(store / f"{'b' * 32}.safetensors"),
    ]
    (store / f"{'c' * 32}.safetensors").mkdir()
    (store / f"{'d' * 32}.safetensors").symlink_to(lora)
    mine = {p: p.read_bytes() for p in [*planted, lora]}
    code, err = cli(capsys, *common, f"cache.dir={cache}", "cache.max_gb=0", f"output_dir={root / 'd'}")
    assert code == 0, err
    assert not stale.exists()
    assert {p: p.read_bytes() for p in mine} == mine and (store / f"{'c' * 32}.safetensors").is_dir()
    assert os.path.islink(store / f"{'d' * 32}.safetensors")


def test_a_run_folders_config_never_passes_on_loading_pickles(tmp_path):
    """``checkpoint=RUN`` takes that run's base from its config.yaml, but not ``model.allow_pickle``: a copied or
    edited run folder must not switch on loading pickled (code-running) weights."""
    from omegaconf import OmegaConf

    from tuner.compose import compose

    made = compose("lora", [f"model.path={tmp_path / 'base'}", "model.allow_pickle=true", "model.resolution=16"])
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(OmegaConf.to_yaml(made))
    (run / "summary.json").write_text("{}")
    cfg = compose("generate", [f"checkpoint={run}"])
    assert cfg.model.path == str(tmp_path / "base") and cfg.model.resolution == 16
    assert cfg.model.allow_pickle is False
    assert compose("generate", [f"checkpoint={run}", "model.allow_pickle=true"]).model.allow_pickle is True


@pytest.mark.parametrize("name", ["../../victim.bin", "/etc/hostname", "sub/__0_0.distcp", "LINK"])
def test_a_sharded_checkpoint_whose_metadata_names_a_file_outside_it_is_damaged(tmp_path, name):
    """torch reads the data files a sharded checkpoint's ``.metadata`` names: only plain names in its folder."""
    import dataclasses
    import pickle

    from tests.test_sharding import ONE, state, tensors
    from tuner.training import checkpoints
    from tuner.training.checkpoint_files import SHARDED, damage, read_sharded_metadata

    (tmp_path / "victim.bin").write_bytes(b"\0" * 4096)
    path = checkpoints.save_sharded(checkpoints.Checkpointing(folder=tmp_path / "checkpoints", keep=3), 3,
                                    tensors(0), state(), ONE)  # fmt: skip
    folder = path / SHARDED
    if name == "LINK":  # a data file's name, but a link to a file outside
        [data] = folder.glob("*.distcp")
        data.rename(tmp_path / "moved.distcp")
        data.symlink_to(tmp_path / "moved.distcp")
        name = data.name
    metadata = read_sharded_metadata(folder)
    metadata.storage_data = {k: dataclasses.replace(v, relative_path=name) for k, v in metadata.storage_data.items()}
    (folder / ".metadata").write_bytes(pickle.dumps(metadata))
    file, reason = damage(path)
    assert file == folder and f"names a data file {name!r} that is not a plain file name" in reason, reason
    assert (tmp_path / "victim.bin").read_bytes() == b"\0" * 4096


def test_a_feature_models_weight_index_naming_a_file_outside_its_folder_is_refused(tmp_path):
    """``model.safetensors.index.json`` names the weights files to read: only the folder's own."""
    from tuner.scoring import check_folder

    _foreign(tmp_path / "outside.safetensors")
    folder = tmp_path / "clip"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "clip"}))
    index = {"weight_map": {"text_model.embeddings.token_embedding.weight": "../outside.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ConfigError, match=r"eval.clip=.*index\.json is damaged: it names '\.\./outside"):
        check_folder(str(folder), "clip")
