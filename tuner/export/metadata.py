"""Hashes and the metadata kohya's trainer writes into a LoRA file (``ss_*``) plus the SAI model spec (``modelspec.*``).

A1111 and ComfyUI show these in their LoRA browsers; A1111 identifies a LoRA by ``sshs_model_hash``, the
sha256 of the file's tensor bytes (everything after the safetensors header), so editing metadata keeps it.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from pathlib import Path

import torch

CHUNK = 1 << 20


def sha256_file(path: Path, offset: int = 0, bar=None) -> str:
    """The file's sha256 from ``offset``; ``bar`` (a tqdm in bytes) advances as it reads."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(offset)
        while block := f.read(CHUNK):
            h.update(block)
            if bar is not None:
                bar.update(len(block))
    return h.hexdigest()


def safetensors_data_offset(path: Path) -> int:
    """Where the tensor bytes start: after the 8-byte header length and the JSON header."""
    with open(path, "rb") as f:
        return 8 + struct.unpack("<Q", f.read(8))[0]


def model_hash(path: Path) -> str:
    """The kohya / A1111 model hash of a safetensors file: sha256 of its tensor bytes."""
    return sha256_file(path, safetensors_data_offset(path))


def file_hashes(path: Path) -> tuple[str, str | None]:
    """(sha256 of the file, its model hash if it is a safetensors file), reading it once."""
    whole, data = hashlib.sha256(), hashlib.sha256()
    start = safetensors_data_offset(path) if path.suffix == ".safetensors" else None
    seen = 0
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            whole.update(block)
            if start is not None and seen + len(block) > start:
                data.update(block[max(0, start - seen) :])
            seen += len(block)
    return whole.hexdigest(), data.hexdigest() if start is not None else None


def tensor_hashes(state: dict[str, torch.Tensor], metadata: dict[str, str]) -> dict[str, str]:
    """``sshs_model_hash`` and ``modelspec.hash_sha256`` of the file ``state`` will be written as."""
    from safetensors.torch import save

    data = save({k: v.contiguous() for k, v in state.items()})
    digest = hashlib.sha256(data[8 + struct.unpack("<Q", data[:8])[0] :]).hexdigest()
    return {"sshs_model_hash": digest, "modelspec.hash_sha256": f"0x{digest}"}


def folder_hash(folder: Path) -> str:
    """One sha256 for a diffusers pipeline folder: over each weight file's relative path and sha256, sorted."""
    from tqdm.auto import tqdm

    h = hashlib.sha256()
    # a variant holds the same weights
    paths = [p for p in sorted(folder.rglob("*.safetensors")) if ".fp16." not in p.name and ".bf16." not in p.name]
    total = sum(p.stat().st_size for p in paths)
    with tqdm(total=total, desc="hash base weights", unit="B", unit_scale=True, leave=False) as bar:
        for path in paths:
            h.update(f"{path.relative_to(folder)}:{sha256_file(path, bar=bar)}\n".encode())
    return h.hexdigest()


def tag_frequency(captions_by_set: dict[str, list[str]]) -> dict[str, dict[str, int]]:
    """kohya's ``ss_tag_frequency``: per dataset, how many captions hold each comma-separated tag."""
    out = {}
    for name, captions in captions_by_set.items():
        counts: dict[str, int] = {}
        for caption in captions:
            for tag in {t.strip() for t in caption.split(",") if t.strip()}:
                counts[tag] = counts.get(tag, 0) + 1
        out[name] = dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
    return out


def training_metadata(info: dict) -> dict[str, str]:
    """ss_* and modelspec.* strings from what the run knows (missing facts are left out, never guessed).

    ``info`` keys: name, architecture, resolution, base_name, base_hash, steps, learning_rate,
    unet_lr, text_encoder_lr, seed, batch_size, optimizer, lr_scheduler, mixed_precision, noise_offset,
    snr_gamma, num_images, num_class_images, tag_frequency, trigger, prediction_type, started, finished,
    version, description.
    """

    def put(key, value):
        if isinstance(value, float) and not math.isfinite(value):
            return  # JSON has no NaN: a reader would choke on the whole metadata
        if value is not None:
            meta[key] = value if isinstance(value, str) else json.dumps(value, allow_nan=False)

    meta: dict[str, str] = {}
    resolution = info.get("resolution")
    put("ss_output_name", info.get("name"))
    put("ss_sd_model_name", info.get("base_name"))
    put("ss_new_sd_model_hash", info.get("base_hash"))
    put("ss_base_model_version", info.get("base_version"))
    put("ss_v2", str(info.get("v2", False)))
    put("ss_resolution", f"({resolution}, {resolution})" if resolution else None)
    put("ss_max_train_steps", info.get("steps"))
    put("ss_learning_rate", info.get("learning_rate"))
    put("ss_unet_lr", info.get("unet_lr"))
    put("ss_text_encoder_lr", info.get("text_encoder_lr"))
    put("ss_seed", info.get("seed"))
    put("ss_batch_size_per_device", info.get("batch_size"))
    put("ss_optimizer", info.get("optimizer"))
    put("ss_lr_scheduler", info.get("lr_scheduler"))
    put("ss_mixed_precision", info.get("mixed_precision"))
    put("ss_noise_offset", info.get("noise_offset"))
    put("ss_min_snr_gamma", info.get("snr_gamma"))
    put("ss_num_train_images", info.get("num_images"))
    put("ss_num_reg_images", info.get("num_class_images"))
    put("ss_tag_frequency", info.get("tag_frequency"))
    put("ss_training_started_at", info.get("started"))
    put("ss_training_finished_at", info.get("finished"))
    put("ss_training_comment", info.get("description"))
    meta["modelspec.sai_model_spec"] = "1.0.0"
    put("modelspec.architecture", info.get("architecture"))
    put("modelspec.implementation", "diffusers")
    put("modelspec.title", info.get("name"))
    put("modelspec.description", info.get("description"))
    put("modelspec.resolution", f"{resolution}x{resolution}" if resolution else None)
    put("modelspec.prediction_type", info.get("prediction_type"))
    put("modelspec.trigger_phrase", info.get("trigger"))
    put("modelspec.date", info.get("date"))
    put("tuner_version", info.get("version"))
    return meta
