"""The shared, content-addressed cache of frozen outputs (tuner/training/cache.py): reads, hashes, damage,
concurrent writers, eviction; and through training runs: reuse across run folders, invalidation by content."""

from __future__ import annotations

import json
import multiprocessing
import os
from pathlib import Path

import pytest
import torch
from PIL import Image

from tests.helpers import train_in_process
from tuner.training.cache import Store, cached, evict, fingerprint, read_index

LATENTS = "latents-" + "0" * 32  # an encoder's folder in the cache


def items(n: int, seed: int = 0, prefix: str = "k") -> dict[str, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return {
        f"{prefix}{i}": {"mean": torch.randn(4, 3, 3, generator=g), "std": torch.rand(4, 3, 3, generator=g).bfloat16()}
        for i in range(n)
    }


def accelerator():
    from accelerate import Accelerator

    return Accelerator(cpu=True)


def test_entries_read_back_bit_exact_in_the_order_asked(tmp_path):
    store = Store(tmp_path, LATENTS)
    written = items(5)
    store.write({k: written[k] for k in ("k0", "k1", "k2")})
    store.write({k: written[k] for k in ("k3", "k4")})
    keys = ["k4", "k0", "k2", "k3", "k1"]
    entries = store.open(keys)
    for i, key in enumerate(keys):
        got = entries[i]
        assert got.keys() == written[key].keys()
        for name, t in written[key].items():
            assert got[name].dtype == t.dtype and torch.equal(got[name], t)
    column = entries.column("mean")
    assert column.shape(0) == (4, 3, 3)
    assert torch.equal(column[torch.tensor([2, 0])], torch.stack([written["k2"]["mean"], written["k4"]["mean"]]))
    assert store.check(keys + ["k9"]) == [5]
    entries.close()


def test_cached_computes_only_what_the_store_lacks(tmp_path):
    store, written, calls = Store(tmp_path, "prompts-x"), items(6), []

    def compute(ids):
        calls.append(list(ids))
        return [written[f"k{i}"] for i in ids]

    keys = [f"k{i}" for i in range(6)]
    entries, encoded = cached(store, keys[:4], compute, accelerator(), "test")
    assert encoded == 4 and calls == [[0, 1, 2, 3]]
    entries, encoded = cached(store, keys, compute, accelerator(), "test")
    assert encoded == 2 and calls[-1] == [4, 5]  # positions in the keys asked for
    assert all(torch.equal(entries[i]["mean"], written[k]["mean"]) for i, k in enumerate(keys))


def flip_a_data_byte(shard: Path) -> None:
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0xFF
    shard.write_bytes(bytes(data))


def test_an_entry_failing_its_hash_or_a_damaged_shard_is_encoded_again(tmp_path, capsys):
    store, written = Store(tmp_path, LATENTS), items(4)
    calls = []

    def compute(ids):
        calls.append(list(ids))
        return [written[f"k{i}"] for i in ids]

    keys = [f"k{i}" for i in range(4)]
    cached(store, keys, compute, accelerator(), "test")
    [shard] = store.shards()
    flip_a_data_byte(shard)  # the last entry's bytes: the header still reads
    entries, encoded = cached(store, keys, compute, accelerator(), "test")
    assert encoded == 4 and calls[-1] == [0, 1, 2, 3]  # the shard went, with all it held
    assert "fail their hash" in capsys.readouterr().out
    assert all(torch.equal(entries[i]["std"], written[k]["std"]) for i, k in enumerate(keys))
    [shard] = store.shards()
    shard.write_bytes(shard.read_bytes()[:100])  # truncated mid-header: nothing shows tuner wrote it, so it is
    entries, encoded = cached(store, keys, compute, accelerator(), "test")  # not read, and not deleted either
    assert encoded == 4 and "not a shard tuner can read" in capsys.readouterr().out
    assert torch.equal(entries[3]["mean"], written["k3"]["mean"])
    assert store.shards() == [shard] and read_index(shard)[0].keys() == {"k0", "k1", "k2", "k3"}  # written anew


def _write_many(root: str, seed: int, times: int) -> None:
    store = Store(Path(root), LATENTS)
    for _ in range(times):
        store.write(items(3, seed))


@pytest.mark.e2e  # two processes: -m e2e
def test_concurrent_writers_of_the_same_entries_never_leave_a_broken_shard(tmp_path):
    """Two processes write the same shard over and over while this one reads it: every read is whole."""
    ctx = multiprocessing.get_context("spawn")
    writers = [ctx.Process(target=_write_many, args=(str(tmp_path), 0, 60)) for _ in range(2)]
    for w in writers:
        w.start()
    store, reads = Store(tmp_path, LATENTS), 0
    while any(w.is_alive() for w in writers) or reads == 0:
        for shard in store.shards():
            entries, hashes = read_index(shard)  # raises on a partial file
            assert set(entries) == {"k0", "k1", "k2"}
            reads += 1
    for w in writers:
        w.join()
        assert w.exitcode == 0
    [shard] = store.shards()
    assert store.check(["k0", "k1", "k2"]) == []
    assert [p for p in tmp_path.rglob("*") if p.is_file() and p != shard] == [tmp_path / "tuner-cache.json"]  # no temp


def test_eviction_removes_the_least_recently_used_shards_first_and_never_those_in_use(tmp_path):
    store = Store(tmp_path, LATENTS)
    shards = [store.write(items(2, seed, prefix=f"s{seed}-")) for seed in range(4)]
    for age, shard in enumerate(shards):  # shards[0] the oldest
        os.utime(shard, (1_000_000 + age, 1_000_000 + age))
    size = shards[0].stat().st_size
    removed = evict(tmp_path, max_gb=2.5 * size / 2**30, keep={shards[1]})
    assert removed == [shards[0], shards[2]]
    assert sorted(store.shards()) == sorted([shards[1], shards[3]])
    (tmp_path / LATENTS / "notes.txt").write_text("not tuner's")
    evict(tmp_path, max_gb=0, keep=set())
    assert [p.name for p in (tmp_path / LATENTS).iterdir()] == ["notes.txt"]


def test_fingerprint_follows_weights_not_names():
    a = torch.nn.Linear(8, 8)
    b = torch.nn.Linear(8, 8)
    b.load_state_dict(a.state_dict())
    assert fingerprint("vae", "torch.float32", modules=[a]) == fingerprint("vae", "torch.float32", modules=[b])
    with torch.no_grad():
        b.weight[3, 5] += 1e-3
    assert fingerprint("vae", "torch.float32", modules=[a]) != fingerprint("vae", "torch.float32", modules=[b])
    assert fingerprint("vae", "torch.float32", modules=[a]) != fingerprint("vae", "torch.bfloat16", modules=[a])


def cache_of(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())["metrics"]["cache"]


@pytest.mark.e2e  # five runs: -m e2e
def test_runs_share_the_cache_and_encode_only_what_changed(tmp_path, tiny_pipeline_dir):
    """Two run folders, one cache: the second encodes nothing; a touched image nothing; a changed pixel one
    latent; other VAE weights every latent again (the captions' embeddings stay)."""
    home = f"home={tmp_path / 'home'}"
    first = train_in_process(tmp_path, tiny_pipeline_dir, home, "stages=[base,prepare,train]", name="a")
    assert first and cache_of(tmp_path / "a")["encoded"] == {"latents-instance": 3, "prompts": 2}
    train_in_process(tmp_path, tiny_pipeline_dir, home, "stages=[base,prepare,train]", name="b")
    assert cache_of(tmp_path / "b")["encoded"] == {"latents-instance": 0, "prompts": 0}
    photo = tmp_path / "photos" / "photo_1.png"
    os.utime(photo)  # touched, unchanged: prepared again (its mtime moved), nothing encoded
    train_in_process(tmp_path, tiny_pipeline_dir, home, "stages=[base,prepare,train]", name="c")
    assert cache_of(tmp_path / "c")["encoded"] == {"latents-instance": 0, "prompts": 0}
    image = Image.open(photo)
    image.putpixel((image.width // 2, image.height // 2), (0, 0, 0))  # inside any crop
    image.save(photo)
    train_in_process(tmp_path, tiny_pipeline_dir, home, "stages=[base,prepare,train]", name="d")
    assert cache_of(tmp_path / "d")["encoded"] == {"latents-instance": 1, "prompts": 0}

    import shutil

    from diffusers import AutoencoderKL

    other = tmp_path / "other-vae"
    shutil.copytree(tiny_pipeline_dir, other)
    vae = AutoencoderKL.from_pretrained(other / "vae")
    with torch.no_grad():
        vae.encoder.conv_in.bias += 0.01
    vae.save_pretrained(other / "vae")
    train_in_process(tmp_path, other, home, "stages=[base,prepare,train]", name="e")
    assert cache_of(tmp_path / "e")["encoded"] == {"latents-instance": 3, "prompts": 0}
    assert not (tmp_path / "e" / "cache").exists()  # nothing in the run folder

    # cache.max_gb=0: everything but what the run reads goes (the first VAE's latents), and it still trains
    cache = tmp_path / "home" / "cache"
    before = {p.parent.name for p in cache.glob("*/*.safetensors")}
    assert len(before) == 3  # two VAEs' latents, one set of prompts
    train_in_process(tmp_path, other, home, "stages=[base,prepare,train]", "cache.max_gb=0", name="f")
    assert cache_of(tmp_path / "f")["encoded"] == {"latents-instance": 0, "prompts": 0}
    after = {p.parent.name for p in cache.glob("*/*.safetensors")}
    assert len(after) == 2 and after < before


@pytest.mark.parametrize("bits", [0, 3, 10, 63])
def test_banded_near_duplicates_equal_comparing_every_pair(bits):
    import random

    from tuner.data.images import NearDuplicates

    rng = random.Random(bits)
    hashes = []
    for _ in range(1000):  # clusters: copies of a few hashes with a few bits flipped, and strangers
        if hashes and rng.random() < 0.5:
            h = rng.choice(hashes)
            for _ in range(rng.randint(0, 2 * bits + 2)):
                h ^= 1 << rng.randrange(64)
        else:
            h = rng.getrandbits(64)
        hashes.append(h)
    found, kept, exact = NearDuplicates(bits), [], []
    for h in hashes:
        near = any((k ^ h).bit_count() <= bits for k in kept)
        exact.append(near)
        if not near:
            kept.append(h)
    banded = []
    for h in hashes:
        banded.append(found.near(h))
        if not banded[-1]:
            found.keep(h)
    assert banded == exact
    assert 100 < sum(exact) < 900 or bits in (0, 63)
