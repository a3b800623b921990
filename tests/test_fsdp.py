"""FSDP2 (``distributed.strategy=fsdp``) in real processes: torchrun and accelerate launch start 2 ranks on the
CPUs (gloo), which shard the trained modules with ``fully_shard``, save sharded checkpoints with
torch.distributed.checkpoint and gather the modules whole on rank 0 for the export.

Each check compares with an independent run: one process, no sharding, the same global batch. SGD keeps the
comparison at fp32 level (see tests/test_distributed.py's ``runs``).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import accelerate_launch, make_photos, torchrun

pytestmark = pytest.mark.e2e  # runs `python -m tuner` in processes: `pytest -m e2e`

UNET = "merged/unet/diffusion_pytorch_model.safetensors"
TEXT_ENCODER = "merged/text_encoder/model.safetensors"


def one_process(args, cwd: Path, name: str) -> None:
    env = {**os.environ, "TUNER_HOME": str(cwd / "home"), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "tuner", *args, f"output_dir={cwd / name}"], cwd=cwd, env=env, capture_output=True,
        text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]


def worst(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def full(tmp_path_factory, tiny_pipeline_dir):
    """A full fine-tune of the U-Net and the text encoder: 2 FSDP processes at batch 2, 1 process at batch 4."""
    tmp = tmp_path_factory.mktemp("fsdp")
    photos = make_photos(tmp / "photos", 4)
    args = [
        "recipe=dreambooth_lora",
        f"model.path={tiny_pipeline_dir}",
        "data.resolution=16",
        f"data.instance_dir={photos}",
        "data.instance_prompt=a photo of sks ball",
        "adapter=full",
        "text_encoder.train=full",  # two modules sharded
        "train.optimizer=sgd",
        "train.learning_rate=5e-2",
        "train.max_steps=6",
        "train.log_every=2",
        "checkpoints.every=3",
        "checkpoints.keep=3",
        "validation.every=3",  # sampled by both ranks: each forward gathers the shards
        "validation.seeds=[0]",
        "validation.steps=2",
        "stages=[base,prepare,train,export]",
        "export.formats=[merged]",
    ]
    two = torchrun([*args, "distributed.strategy=fsdp", "train.batch_size=2", f"output_dir={tmp / 'two'}"], tmp, "two")
    assert two.wait() == 0, two.text[-3000:]
    one_process([*args, "train.batch_size=4"], tmp, "one")
    return tmp, args, two


def test_two_fsdp_processes_train_as_one_process_and_rank_0_exports_what_diffusers_loads(full, tiny_pipeline_dir):
    from diffusers import UNet2DConditionModel

    tmp, _, two = full
    base = load_file(tiny_pipeline_dir / "unet" / "diffusion_pytorch_model.safetensors")
    sharded, whole = load_file(tmp / "two" / UNET), load_file(tmp / "one" / UNET)
    assert worst(sharded, whole) < 1e-6
    assert worst(sharded, base) > 1e-2  # it trained
    assert worst(load_file(tmp / "two" / TEXT_ENCODER), load_file(tmp / "one" / TEXT_ENCODER)) < 1e-6
    # the export reloads in diffusers as the one-process run's weights
    unet = UNet2DConditionModel.from_pretrained(tmp / "two" / "merged" / "unet")
    assert worst({k: v for k, v in unet.state_dict().items() if k in whole}, whole) < 1e-6
    # the checkpoints are sharded: one data file per rank, no whole copy of the trained tensors
    for step in (3, 6):
        folder = tmp / "two" / "checkpoints" / f"step-{step:07d}"
        assert sorted(p.name for p in (folder / "sharded").iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
        assert not (folder / "trained.safetensors").exists()
    summary = json.loads((tmp / "two" / "summary.json").read_text())
    assert summary["processes"] == 2
    fsdp = summary["metrics"]["fsdp"]  # rank 0 held half of the weights (and of their gradients and state)
    assert fsdp["processes"] == 2 and 0.45 < fsdp["weights_mib_rank0"] / fsdp["weights_mib_whole"] < 0.55
    one_summary = json.loads((tmp / "one" / "summary.json").read_text())
    assert abs(summary["metrics"]["train_loss"]["last"] - one_summary["metrics"]["train_loss"]["last"]) < 1e-4
    steps = json.loads((tmp / "two" / "validation" / "steps.json").read_text())["steps"]
    assert [s["step"] for s in steps] == [0, 3, 6]
    assert "gathered denoiser, text_encoder from the shards on rank 0" in two.text
    assert "rank 1: done; rank 0 goes on with export" in two.text


def test_a_sharded_checkpoint_of_two_processes_resumes_on_one(full):
    """torch.distributed.checkpoint reshards: the 2 ranks' shards of step 3 read back by a single process,
    which ends where the uninterrupted 2-process run ended."""
    tmp, args, _ = full
    step3 = tmp / "two" / "checkpoints" / "step-0000003"
    one_process([*args, "distributed.strategy=fsdp", "train.batch_size=4", f"resume={step3}"], tmp, "resumed")
    assert worst(load_file(tmp / "resumed" / UNET), load_file(tmp / "two" / UNET)) < 1e-6
    assert worst(load_file(tmp / "resumed" / TEXT_ENCODER), load_file(tmp / "two" / TEXT_ENCODER)) < 1e-6
    # a sharded checkpoint into a run that does not shard: refused by name
    env = {**os.environ, "TUNER_HOME": str(tmp / "home")}
    done = subprocess.run(
        [sys.executable, "-m", "tuner", *args, "train.batch_size=4", f"resume={step3}", f"output_dir={tmp / 'ddp'}"],
        cwd=tmp, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode != 0
    assert "saved sharded (distributed.strategy=fsdp), this run does not shard" in done.stderr


def test_accelerate_launch_with_the_fsdp_config_shards_a_partial_fine_tune_as_one_process_trains_it(
    full, tiny_pipeline_dir
):
    """``tools/launch/accelerate_fsdp.yaml`` (8 processes cut to 2, on the CPUs) is read as
    distributed.strategy=fsdp; the U-Net's up-block attentions train, the rest stays the base's, bit for bit."""
    import fnmatch

    tmp, args, _ = full
    partial = [a for a in args if not a.startswith(("adapter=", "text_encoder.train=", "stages="))]
    # the gallery after validation: rank 0 samples with the gathered U-Net, not validation's sharded pipeline
    partial += ["adapter=partial_unet", "stages=[base,prepare,train,export,gallery]", "sample.steps=2"]
    done = accelerate_launch("accelerate_fsdp.yaml", [*partial, "train.batch_size=2"], tmp, tmp / "accelerate")
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp / "accelerate" / "checkpoints" / "step-0000006" / "sharded" / "__1_0.distcp").is_file()
    assert (tmp / "accelerate" / "gallery" / "index.html").is_file()
    one_process([*partial, "train.batch_size=4"], tmp, "partial_one")
    sharded, whole = load_file(tmp / "accelerate" / UNET), load_file(tmp / "partial_one" / UNET)
    assert worst(sharded, whole) < 1e-6
    base = load_file(tiny_pipeline_dir / "unet" / "diffusion_pytorch_model.safetensors")
    trained = [k for k in sharded if fnmatch.fnmatchcase(k, "up_blocks.*.attentions.*")]
    assert trained and all(torch.equal(sharded[k], base[k]) for k in sharded if k not in trained)
    assert max((sharded[k] - base[k]).abs().max().item() for k in trained) > 1e-3


def test_lora_under_fsdp_in_bf16_with_checkpointing_and_ema_resumes_exactly_and_loads_in_diffusers(
    full, tiny_pipeline_dir
):
    """LoRA on a sharded frozen base, bf16, gradient checkpointing, AdamW
    and an EMA of the adapter: stopped at step 3 and resumed on 2 processes, it ends bit for bit where the
    uninterrupted run ends; the exported adapter loads in diffusers and changes the U-Net's output."""
    from diffusers import StableDiffusionPipeline

    tmp, args, _ = full
    lora = [a for a in args if not a.startswith(("adapter=", "text_encoder.train=", "train.", "export."))] + [
        "adapter=lora",
        "train.mixed_precision=bf16",
        "train.gradient_checkpointing=true",
        "train.optimizer=adamw",
        "train.learning_rate=1e-3",
        "train.ema_decay=0.9",
        "train.max_steps=6",
        "train.batch_size=2",
        "export.formats=[diffusers]",
        "distributed.strategy=fsdp",
    ]
    run = torchrun([*lora, f"output_dir={tmp / 'lora'}"], tmp, "lora")
    assert run.wait() == 0, run.text[-3000:]
    step3 = tmp / "lora" / "checkpoints" / "step-0000003"
    again = torchrun([*lora, f"resume={step3}", f"output_dir={tmp / 'lora_resumed'}"], tmp, "lora_resumed")
    assert again.wait() == 0, again.text[-3000:]
    name = "diffusers/pytorch_lora_weights.safetensors"
    adapter, resumed = load_file(tmp / "lora" / name), load_file(tmp / "lora_resumed" / name)
    assert worst(adapter, resumed) == 0.0
    assert max(v.abs().max().item() for k, v in adapter.items() if "lora_B" in k) > 1e-4  # it trained

    pipe = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir)
    sample, t = torch.randn(1, 4, 2, 2, generator=torch.Generator().manual_seed(0)), torch.tensor([500])
    cond = torch.randn(1, 77, pipe.unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = pipe.unet(sample, t, cond).sample
        pipe.load_lora_weights(tmp / "lora" / "diffusers")
        after = pipe.unet(sample, t, cond).sample
    assert (after - before).abs().max().item() > 1e-5


def test_the_best_sharded_checkpoint_is_gathered_and_exported(full):
    """Under FSDP the held-out loss is computed by both ranks (each forward gathers), early stop and
    export.from=best read the best step's shards back before gathering: the export equals one process trained to
    that step, and the held-out losses equal that process's."""
    tmp, args, _ = full
    args = [a for a in args if not a.startswith(("checkpoints.every=", "validation.every=", "train.max_steps="))]
    held = ["data.val_split=0.25", "validation.every=2"]
    stop = ["checkpoints.select=val_loss", "train.early_stop.patience=1", "train.early_stop.min_delta=1e6",
            "export.from=best", "train.max_steps=8"]  # fmt: skip
    two = torchrun([*args, *held, *stop, "distributed.strategy=fsdp", "train.batch_size=2",
                    f"output_dir={tmp / 'best'}"], tmp, "best")  # fmt: skip
    assert two.wait() == 0, two.text[-3000:]
    summary = json.loads((tmp / "best" / "summary.json").read_text())["metrics"]
    losses = summary["validation"]["val_loss"]
    best = min((2, 4), key=lambda s: (losses[str(s)], -s))
    assert summary["early_stop"]["step"] == 4 and summary["selected"]["step"] == best
    one_process([*args, *held, f"train.max_steps={best}", "train.batch_size=4"], tmp, "short")
    alone = json.loads((tmp / "short" / "summary.json").read_text())["metrics"]["validation"]["val_loss"]
    assert abs(alone["2"] - losses["2"]) < 1e-6
    assert worst(load_file(tmp / "best" / UNET), load_file(tmp / "short" / UNET)) < 1e-6
