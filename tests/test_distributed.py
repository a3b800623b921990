"""Several processes through torchrun (gloo on the CPUs): they train as one process with the larger batch.

Every run here is real: ``python -m torch.distributed.run`` starts the workers, which meet in a gloo
process group, run DistributedDataParallel through accelerate and write one run folder.
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from tests.helpers import Launch, accelerate_launch, adapter, free_port, make_photos, torchrun
from tuner.training.batches import Batch, merge_by_shape
from tuner.training.cache import read_index
from tuner.training.checkpoint_files import find

pytestmark = pytest.mark.e2e  # runs `python -m tuner` in processes: `pytest -m e2e`


def assert_close(a: dict, b: dict, atol: float):
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= atol, worst


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_pipeline_dir):
    """The same training by 2 processes at batch 2 and by 1 process at batch 4.

    SGD rather than Adam: Adam divides each gradient by its own running size, so a weight whose
    gradient is ~0 moves by +-lr on float rounding alone, whatever the process count (measured:
    1.5e-4 apart after 6 steps at lr 1e-2, with identical losses); SGD keeps the comparison at fp32 level.
    """
    tmp = tmp_path_factory.mktemp("distributed")
    photos, classes = make_photos(tmp / "photos", 4), make_photos(tmp / "classes", 4)
    args = [
        "recipe=dreambooth_lora",
        f"model.path={tiny_pipeline_dir}",
        "data.resolution=16",
        f"data.instance_dir={photos}",
        "data.instance_prompt=a photo of sks ball",
        f"data.class_dir={classes}",
        "data.class_prompt=a photo of a ball",
        "prior.num_class_images=6",  # 4 there: the 2 processes generate one each
        "data.caption_dropout=0.3",
        "text_encoder.train=lora",  # two modules in DistributedDataParallel
        "train.gradient_accumulation_steps=2",
        "train.optimizer=sgd",
        "train.learning_rate=5e-2",
        "train.max_steps=30",
        "train.log_every=5",
        "stages=[base,prepare,class_images,train,export]",
        "export.formats=[diffusers]",
    ]
    two = torchrun([*args, "train.batch_size=2", f"output_dir={tmp / 'two'}"], tmp, "two")
    assert two.wait() == 0, two.text[-3000:]
    one = subprocess.run(
        [sys.executable, "-m", "tuner", *args, "train.batch_size=4", f"output_dir={tmp / 'one'}"],
        cwd=tmp,
        env={**os.environ, "TUNER_HOME": str(tmp / "home")},
        capture_output=True,
        text=True,
    )
    assert one.returncode == 0, one.stderr[-3000:]
    return tmp, args, two


def test_two_processes_at_batch_2_train_as_one_process_at_batch_4(runs):
    tmp, _, two = runs
    assert_close(adapter(tmp / "two"), adapter(tmp / "one"), atol=1e-6)
    assert any(k.startswith("text_encoder.") for k in adapter(tmp / "two"))
    one_summary = json.loads((tmp / "one" / "summary.json").read_text())
    two_summary = json.loads((tmp / "two" / "summary.json").read_text())
    assert two_summary["processes"] == 2
    for key in ("first", "last"):  # the logged loss is the global batch's
        assert abs(one_summary["metrics"]["train_loss"][key] - two_summary["metrics"]["train_loss"][key]) < 1e-4
    # the missing class images were generated once, split between the ranks, never overwriting the user's
    assert sorted(p.name for p in (tmp / "classes").glob("class_*.png")) == ["class_00000.png", "class_00001.png"]
    assert len(list((tmp / "classes").glob("photo_*.png"))) == 4
    # frozen outputs: each rank encoded its share of the missing latents into a shard of its own, in the cache
    # every run shares ($TUNER_HOME/cache); the class folder's 4 photos are the instance photos, found there, so
    # only the 2 generated class images were encoded for the class set. The one-process run encoded nothing.
    # (The prompts are not frozen outputs here: the text encoder trains.)
    cache = tmp / "home" / "cache"
    assert not list(cache.glob("prompts-*")) and not (tmp / "two" / "cache").exists()
    assert two_summary["metrics"]["cache"]["encoded"] == {"latents-instance": 4, "latents-class": 2}
    assert one_summary["metrics"]["cache"]["encoded"] == {"latents-instance": 0, "latents-class": 0}
    [store] = cache.glob("latents-*")
    shards = [set(read_index(p)[0]) for p in store.glob("*.safetensors")]
    assert sorted(map(len, shards)) == [1, 1, 2, 2]  # instance: 2 per rank; class: 1 per rank
    assert len(set().union(*shards)) == 6
    # rank 0 alone wrote the outputs; rank 1 left once nothing more needed it
    assert "rank 1: done; rank 0 goes on with export" in two.text
    assert two.text.count("== tuner dreambooth_lora: done") == 1


def test_two_nodes_meeting_at_localhost_train_as_the_single_node_run(runs):
    """Two launchers, one per simulated node, rendezvous at 127.0.0.1; the run folder is named with
    ``${now:...}`` down to the microsecond, so each rank resolves another name: rank 0's is used."""
    tmp, args, _ = runs
    port = free_port()
    nodes = [
        Launch(
            [
                "--nnodes=2",
                f"--node_rank={r}",
                "--nproc_per_node=1",
                "--master_addr=127.0.0.1",
                f"--master_port={port}",
            ],  # noqa: E501
            [*args, "train.batch_size=2", "output_dir=nodes/${now:%H%M%S%f}"],
            tmp,
            f"node{r}",
        )
        for r in (0, 1)
    ]
    for node in nodes:
        assert node.wait() == 0, node.text[-3000:]
    [run_dir] = (tmp / "nodes").iterdir()
    assert_close(adapter(run_dir), adapter(tmp / "two"), atol=1e-6)


def test_sigterm_to_the_launcher_stops_every_rank_at_one_step_with_a_checkpoint_and_resume_finishes(runs):
    tmp, args, _ = runs
    run = tmp / "termed"
    launch = torchrun([*args, "train.batch_size=2", f"output_dir={run}", "checkpoints.every=5"], tmp, "termed")
    deadline = time.time() + 300
    while not (run / "checkpoints" / "step-0000010" / "state.pt").exists():
        assert launch.process.poll() is None, launch.text[-3000:]
        assert time.time() < deadline
        time.sleep(0.02)
    launch.process.send_signal(signal.SIGTERM)
    launch.wait(timeout=120)  # torchrun's own exit status after a signal is 1 (its agent re-raises it)
    text = launch.text
    stopped = find(run / "checkpoints")[-1]
    step = int(stopped.name.split("-")[1])
    assert 10 <= step < 30 and not (run / "diffusers").exists()
    # both ranks stopped at the same step, after that checkpoint, and exited 0
    assert f"rank 0: stopped by SIGTERM at step {step}; checkpoint {stopped}; exit 0" in text
    assert f"rank 1: stopped by SIGTERM at step {step}; checkpoint {stopped}; exit 0" in text
    assert "resume with:" in text and "ChildFailedError" not in text
    state = torch.load(stopped / "state.pt", weights_only=True)
    assert len(state["ranks"]) == 2  # each rank's RNG and running loss

    again = torchrun([*args, "train.batch_size=2", f"output_dir={run}", "checkpoints.every=5", "resume=auto"], tmp, "r")
    assert again.wait() == 0, again.text[-3000:]
    assert f"resumed from {stopped} at step {step} of 30" in again.text
    assert_close(adapter(run), adapter(tmp / "two"), atol=0)  # bit for bit the uninterrupted run
    summary = json.loads((run / "summary.json").read_text())
    assert set(summary["metrics"]["cache"]["encoded"].values()) == {0}  # read, not redone


def test_accelerate_launch_with_the_multi_gpu_config_runs_the_same_training(runs):
    """``accelerate launch --config_file tools/launch/accelerate_multi_gpu.yaml`` (its 8 processes cut to 2
    here, on the CPUs); the config's bf16 is only a default: train.mixed_precision (no) wins."""
    tmp, args, _ = runs
    done = accelerate_launch("accelerate_multi_gpu.yaml", [*args, "train.batch_size=2"], tmp, tmp / "accelerate")
    assert done.returncode == 0, done.stderr[-3000:]
    assert_close(adapter(tmp / "accelerate"), adapter(tmp / "two"), atol=1e-6)


def test_deepspeed_is_refused_naming_fsdp2_and_ddp_instead():
    from accelerate.utils import DistributedType

    from tuner.distributed import check_engine
    from tuner.errors import ConfigError

    with pytest.raises(ConfigError, match="set up for DeepSpeed.*distributed.strategy=fsdp.*MULTI_GPU"):
        check_engine(DistributedType.DEEPSPEED)
    check_engine(DistributedType.MULTI_CPU)
    check_engine(DistributedType.MULTI_GPU)


@pytest.mark.parametrize("world", [2, 3, 4])
def test_shards_of_a_global_batch_sum_to_its_loss_and_no_rank_is_left_without_a_sample(world):
    generator = torch.Generator().manual_seed(world)
    for n in range(1, 7):
        batch = Batch(torch.randn(n, 4, 2, 2, generator=generator), torch.randn(n, 3, 5), torch.rand(n))
        losses = torch.rand(n, generator=generator)
        whole = (batch.weights * losses).sum()
        shards, total = [], 0.0
        for rank in range(world):
            shard = batch.shard(rank, world)
            assert len(shard.latents) >= 1 and len(shard.cond) == len(shard.weights) == len(shard.latents)
            start, stop = rank * n // world, (rank + 1) * n // world
            picked = losses[start:stop] if stop > start else losses[:1]
            total += (shard.weights * picked).sum() / world  # what DDP's gradient average amounts to
            shards.append(shard)
        torch.testing.assert_close(total, whole)
    [merged] = merge_by_shape([batch.shard(0, 1), batch.shard(0, 1)])
    assert len(merged.latents) == 2 * len(batch.latents)
