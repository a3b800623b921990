"""Dataset sources (imagefolder metadata, kohya folders, datasets on disk, parquet), caption policies,
near-duplicates, aspect-ratio buckets, workers and the incremental cache."""

import hashlib
import io
import json
import random

import numpy as np
import pytest
import torch
from PIL import Image

from tuner.data.buckets import BucketSampler, BucketSettings, assign, bucket_sizes
from tuner.data.prepare import Source, load_prepared, prepare
from tuner.data_config import DataConfig


def _png(size, color=(200, 10, 10)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def _digest(folder):
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()}


def test_imagefolder_metadata_with_escapes_and_missing_captions(tmp_path):
    root = tmp_path / "imgs"
    root.mkdir()
    (root / "a.png").write_bytes(_png((20, 20), (255, 0, 0)))
    (root / "b.png").write_bytes(_png((20, 20), (0, 255, 0)))
    (root / "unlisted.png").write_bytes(_png((20, 20), (0, 0, 255)))
    (tmp_path / "secret.png").write_bytes(_png((20, 20), (9, 9, 9)))
    lines = [
        {"file_name": "a.png", "text": "  a red   square "},
        {"file_name": "b.png"},
        {"file_name": "../secret.png", "text": "escape"},
        {"file_name": "gone.png", "text": "not there"},
        "not json",
    ]
    (root / "metadata.jsonl").write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines))
    settings = DataConfig(resolution=16, trigger="sks")
    report = prepare([Source(str(root))], tmp_path / "out", settings, default_caption="a photo of [trigger]")
    assert sorted(report.kept) == ["a.png", "b.png", "unlisted.png"]
    assert report.rejected == {
        "outside the dataset root": ["../secret.png"],
        "missing file": ["gone.png"],
        "metadata line without a file_name": ["metadata.jsonl:5"],
    }
    captions = {r["source"]: r["caption"] for r in load_prepared(tmp_path / "out")}
    assert captions == {"a.png": "a red square", "b.png": "a photo of sks", "unlisted.png": "a photo of sks"}
    statuses = {f["file"]: f["status"] for f in json.loads((tmp_path / "out" / "report.json").read_text())["files"]}
    assert statuses["a.png"] == "kept" and statuses["gone.png"] == "rejected" and len(statuses) == 6

    rejecting = DataConfig(resolution=16, caption_missing="reject")
    report = prepare([Source(str(root))], tmp_path / "strict", rejecting)
    assert report.kept == ["a.png"] and sorted(report.rejected["caption missing"]) == ["b.png", "unlisted.png"]


def test_kohya_folders_set_repeats_and_captions(tmp_path):
    root = tmp_path / "train"
    (root / "10_sks dog").mkdir(parents=True)
    (root / "2_style").mkdir()
    (root / "10_sks dog" / "one.png").write_bytes(_png((20, 20), (1, 2, 3)))
    (root / "10_sks dog" / "two.png").write_bytes(_png((20, 20), (4, 5, 6)))
    (root / "10_sks dog" / "two.txt").write_text("sks dog on grass")
    (root / "2_style" / "s.png").write_bytes(_png((20, 20), (7, 8, 9)))
    (root / "loose.png").write_bytes(_png((20, 20), (10, 11, 12)))
    report = prepare(
        [Source(str(root))], tmp_path / "out", DataConfig(resolution=16, trigger="sks", trigger_policy="prefix")
    )
    assert report.rejected == {"not in an N_concept folder (kohya layout)": ["loose.png"]}
    rows = {r["source"]: r for r in load_prepared(tmp_path / "out")}
    assert rows["10_sks dog/one.png"]["caption"] == "sks dog" and rows["10_sks dog/one.png"]["repeats"] == 10
    assert rows["10_sks dog/two.png"]["caption"] == "sks dog on grass"
    assert rows["2_style/s.png"]["caption"] == "sks, style" and rows["2_style/s.png"]["repeats"] == 2


def test_datasets_on_disk_and_parquet_sources_with_weights(tmp_path):
    import datasets

    images = [Image.new("RGB", (24, 16), (30 * i, 0, 0)) for i in range(3)]
    table = datasets.Dataset.from_dict(
        {"picture": images, "prompt": ["first", "second", None]},
        features=datasets.Features({"picture": datasets.Image(), "prompt": datasets.Value("string")}),
    )
    table.save_to_disk(str(tmp_path / "hf"))
    table.to_parquet(str(tmp_path / "table.parquet"))
    sources = [
        Source(str(tmp_path / "hf"), image_column="picture", caption="an uncaptioned row"),
        Source(str(tmp_path / "table.parquet"), image_column="picture", caption_column="prompt", repeats=3, weight=0.5),
    ]
    report = prepare(sources, tmp_path / "out", DataConfig(resolution=16))
    # the parquet rows are the same pictures: exact duplicates of the first source's rows
    assert sorted(report.kept) == ["0:row 0", "0:row 1", "0:row 2"]
    assert sorted(report.rejected["duplicate"]) == ["1:row 0", "1:row 1", "1:row 2"]
    rows = load_prepared(tmp_path / "out")
    assert rows["caption"] == ["first", "second", "an uncaptioned row"]
    assert rows[0]["image"].size == (16, 16)

    only_parquet = prepare([sources[1]], tmp_path / "pq", DataConfig(resolution=16), "x")
    assert len(only_parquet.kept) == 3
    rows = load_prepared(tmp_path / "pq")
    assert rows["repeats"] == [3, 3, 3] and rows["weight"] == [0.5, 0.5, 0.5] and rows["caption"][2] == "x"


def test_unsupported_formats_and_near_duplicates(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    Image.new("RGB", (32, 32), (0, 0, 0)).save(src / "icon.ico")
    noise = np.random.default_rng(0).integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    picture = Image.fromarray(noise[0]).resize((64, 64), Image.Resampling.BICUBIC)
    picture.save(src / "a.png")
    picture.resize((60, 60)).save(src / "a_smaller.png")  # the same picture, other bytes
    Image.fromarray(noise[1]).resize((64, 64), Image.Resampling.BICUBIC).save(src / "b.png")
    loose = prepare([Source(str(src))], tmp_path / "loose", DataConfig(resolution=16))
    assert loose.rejected == {"unsupported format (ICO)": ["icon.ico"]}
    strict = prepare([Source(str(src))], tmp_path / "strict", DataConfig(resolution=16, near_duplicate_bits=6))
    assert strict.rejected["near-duplicate"] == ["a_smaller.png"] and sorted(strict.kept) == ["a.png", "b.png"]


def test_bucket_sizes_follow_the_rules():
    s = BucketSettings(resolution=512, step=64, min_ratio=0.5, max_ratio=2.0)
    sizes = bucket_sizes(s)
    assert (512, 512) in sizes and (384, 640) in sizes and (640, 384) in sizes
    for w, h in sizes:
        assert w % 64 == 0 and h % 64 == 0 and w * h <= 512 * 512 and 0.5 <= w / h <= 2.0
    assert assign((4000, 1000), s) == max(sizes, key=lambda b: b[0] / b[1])  # beyond the range: the widest
    assert assign((1000, 1000), s) == (512, 512)
    small = BucketSettings(resolution=512, step=64, upscale=False)
    assert assign((200, 130), small) == (192, 128)  # kept at its own scale, rounded down to the step


def test_every_image_is_in_one_bucket_and_each_epoch_shows_it_once_per_repeat():
    rng = random.Random(0)
    s = BucketSettings(resolution=256, step=32, min_ratio=0.4, max_ratio=2.5)
    sizes = [(rng.randint(100, 1200), rng.randint(100, 1200)) for _ in range(1000)]
    buckets = [assign(size, s) for size in sizes]
    assert set(buckets) <= set(bucket_sizes(s)) and len(set(buckets)) > 5
    repeats = [rng.choice([1, 2, 3]) for _ in sizes]
    sampler = BucketSampler(buckets, repeats)
    epoch = sampler.epoch(torch.Generator().manual_seed(0), batch_size=8)
    seen = [i for batch in epoch for i in batch]
    assert sorted(seen) == sorted(i for i, r in enumerate(repeats) for _ in range(r))
    assert all(len({buckets[i] for i in batch}) == 1 for batch in epoch)  # a batch never mixes buckets
    assert all(1 <= len(batch) <= 8 for batch in epoch)  # small buckets give small batches, none dropped


def test_bucketed_prepare_and_training_end_to_end(tmp_path, tiny_pipeline_dir):
    """Mixed aspect ratios land in their buckets and a LoRA trains on them through the CLI path."""
    from tests.helpers import train_in_process

    src = tmp_path / "photos"
    src.mkdir()
    for i, size in enumerate([(64, 32), (70, 34), (32, 64), (40, 40), (48, 47)]):
        Image.new("RGB", size, (50 * i, 100, 100)).save(src / f"p{i}.png")
    before = _digest(src)
    run = train_in_process(
        tmp_path,
        tiny_pipeline_dir,
        "data.buckets=true",
        "data.bucket_step=8",
        f"data.instance_dir={src}",
        "data.resolution=32",
        "train.max_steps=4",
    )
    assert _digest(src) == before  # sources never touched
    rows = {r["source"]: r for r in load_prepared(run.dir / "data" / "instance")}
    for row in rows.values():
        assert list(row["image"].size) == row["bucket"]
    assert rows["p0.png"]["bucket"] == [40, 24] and rows["p2.png"]["bucket"] == [24, 40]
    assert rows["p3.png"]["bucket"] == [32, 32] and rows["p4.png"]["bucket"] == [32, 32]
    report = json.loads((run.dir / "data" / "instance" / "report.json").read_text())
    assert sum(report["buckets"].values()) == 5
    assert np.isfinite(run.metrics["train_loss"]["last"])


def test_workers_and_the_cache_give_the_same_dataset_and_redo_only_changes(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(12):
        Image.new("RGB", (30 + i, 20), (20 * i, 5, 5)).save(src / f"{i:02d}.png")
    one = prepare([Source(str(src))], tmp_path / "one", DataConfig(resolution=16, crop="random"))
    two = prepare([Source(str(src))], tmp_path / "two", DataConfig(resolution=16, crop="random", workers=2))
    assert one.kept == two.kept
    a, b = load_prepared(tmp_path / "one"), load_prepared(tmp_path / "two")
    assert a["crop"] == b["crop"] and a["sha256"] == b["sha256"]
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a["image"], b["image"]))

    cache = tmp_path / "one" / "cache"
    stamps = {p.name: p.stat().st_mtime_ns for p in cache.glob("*.json")}
    Image.new("RGB", (30, 20), (0, 250, 0)).save(src / "05.png")  # one image changed
    prepare([Source(str(src))], tmp_path / "one", DataConfig(resolution=16, crop="random"))
    after = {p.name: p.stat().st_mtime_ns for p in cache.glob("*.json")}
    assert len(after) == 12 and len(set(after) - set(stamps)) == 1  # one new entry, the stale one pruned
    assert all(after[name] == stamps[name] for name in set(after) & set(stamps))  # the rest reused as they were
    assert np.asarray(load_prepared(tmp_path / "one")[5]["image"])[..., 1].min() > 200


@pytest.mark.parametrize("missing", ["nowhere", "nowhere.parquet"])
def test_a_missing_source_is_named(tmp_path, missing):
    with pytest.raises(FileNotFoundError, match=missing):
        prepare([Source(str(tmp_path / missing))], tmp_path / "out", DataConfig(resolution=16))


def test_prepare_recipe_with_extra_sources(tmp_path):
    """`python -m tuner recipe=prepare` with a folder plus a parquet source: OUT/report.json lists every input."""
    import datasets

    from tests.helpers import make_photos, run_tuner

    photos = make_photos(tmp_path / "photos", n=2)
    pictures = [Image.new("RGB", (20, 30), (0, 40 * i, 0)) for i in range(2)]
    datasets.Dataset.from_dict(
        {"picture": pictures, "prompt": ["green one", "green two"]},
        features=datasets.Features({"picture": datasets.Image(), "prompt": datasets.Value("string")}),
    ).to_parquet(str(tmp_path / "extra.parquet"))
    result = run_tuner(
        "recipe=prepare",
        f"data.instance_dir={photos}",
        "data.resolution=16",
        "data.instance_prompt=a red ball",
        f'data.sources=[{{path: "{tmp_path / "extra.parquet"}", image_column: picture, repeats: 2}}]',
        f"output_dir={tmp_path / 'out'}",
        home=tmp_path / "home",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert sorted(f["file"] for f in report["files"]) == ["0:photo_0.png", "0:photo_1.png", "1:row 0", "1:row 1"]
    rows = load_prepared(tmp_path / "out" / "data" / "instance")
    assert sorted(zip(rows["caption"], rows["repeats"])) == [
        ("a red ball", 1),
        ("a red ball", 1),
        ("green one", 2),
        ("green two", 2),
    ]
    assert "4 kept" in result.stdout


def test_sidecars_obey_the_root_and_odd_layouts_are_handled(tmp_path):
    import os

    import datasets

    root = tmp_path / "train"
    (root / "3_sks cat").mkdir(parents=True)
    (root / ".ipynb_checkpoints").mkdir()  # Colab leaves these beside kohya folders
    (root / "3_sks cat" / "a.png").write_bytes(_png((20, 20), (1, 1, 1)))
    (root / "3_sks cat" / "b.png").write_bytes(_png((20, 20), (2, 2, 2)))
    (tmp_path / "secret.txt").write_text("password")
    os.symlink(tmp_path / "secret.txt", root / "3_sks cat" / "b.txt")
    strict = DataConfig(resolution=16, caption_missing="reject")
    report = prepare([Source(str(root))], tmp_path / "out", strict)
    assert report.kept == ["3_sks cat/a.png"]  # the folder name is its caption, even under reject
    assert report.rejected == {"sidecar outside the dataset root or too large": ["3_sks cat/b.png"]}
    rows = load_prepared(tmp_path / "out")
    assert list(rows["caption"]) == ["sks cat"] and list(rows["repeats"]) == [3]

    table = datasets.Dataset.from_dict({"image": [Image.new("RGB", (20, 20))], "text": [["a", "list"]]})
    table.to_parquet(str(tmp_path / "odd.parquet"))
    report = prepare([Source(str(tmp_path / "odd.parquet"))], tmp_path / "odd", DataConfig(resolution=16))
    assert report.rejected == {"caption not text": ["row 0"]}
