"""FSDP2's pieces in one process (the 2-process runs are tests/test_fsdp.py): the settings, the sharded
checkpoint files, and ``Sharded`` itself in a world of one rank (gloo), against the unsharded module."""

import gc
import os
import weakref
from types import SimpleNamespace

import pytest
import torch

from tuner.checks import validate
from tuner.compose import compose
from tuner.distributed import sharding
from tuner.errors import ConfigError
from tuner.training import checkpoints
from tuner.training.checkpoint_files import SHARDED, damage, newest_intact

ONE = SimpleNamespace(num_processes=1, is_main_process=True)


def test_an_accelerate_fsdp_config_is_read_as_strategy_fsdp_and_its_fsdp1_or_offload_refused(monkeypatch):
    import os

    from tuner import distributed

    monkeypatch.setattr(distributed, "_accelerate_fsdp", None)
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    assert sharding("ddp", True) == ("ddp", True)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    monkeypatch.setenv("FSDP_RESHARD_AFTER_FORWARD", "false")
    assert sharding("ddp", True) == ("fsdp", False)
    assert os.environ["ACCELERATE_USE_FSDP"] == "false"  # accelerate itself then runs as for DDP
    assert sharding("ddp", True) == ("fsdp", False)  # the next run of a sweep in this process too
    monkeypatch.setattr(distributed, "_accelerate_fsdp", None)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "1")
    with pytest.raises(ConfigError, match="FSDP version 1.*fsdp_version: 2"):
        sharding("ddp", True)
    monkeypatch.setenv("FSDP_VERSION", "2")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_OFFLOAD_PARAMS", "true")
    with pytest.raises(ConfigError, match="fsdp_offload_params"):
        sharding("ddp", True)


@pytest.mark.parametrize(
    "override, named",
    [
        ("train.offload_blocks=2", "train.offload_blocks"),
        ("model.quantize=nf4", "model.quantize"),
        ("train.optimizer=adamw8bit", "train.optimizer=adamw8bit"),
        ("train.channels_last=true", "train.channels_last=true"),
        ("embedding.tokens=[sks]", "embedding.tokens"),
    ],
)
def test_what_fsdp_does_not_combine_with_is_refused_before_anything_loads(tmp_path, override, named):
    given = ["model.path=/nowhere", f"data.instance_dir={tmp_path}", "data.instance_prompt=a sks dog"]
    with pytest.raises(ConfigError, match=f"distributed.strategy=fsdp does not combine with {named}"):
        validate(compose("dreambooth_lora", [*given, "distributed.strategy=fsdp", override]))


def tensors(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    trained = {"denoiser.a": torch.randn(6, 3, generator=g), "denoiser.b": torch.randn(5, generator=g)}
    return {"trained": trained, "optimizer": {"state": {"denoiser.a": {"exp_avg": torch.randn(6, 3, generator=g)}}}}


def state() -> dict:
    return {
        "optimizer": {"param_groups": [{"params": ["denoiser.a", "denoiser.b"], "lr": 0.1}]},
        "lr_scheduler": {},
        "ema": None,
        "generator": torch.Generator().get_state(),
        "ranks": [{"torch_rng": torch.get_rng_state(), "running": torch.tensor(0.0)}],
        "losses": [1.0],
    }


def test_a_sharded_checkpoint_reads_back_exactly_and_a_damaged_one_is_named_and_skipped(tmp_path):
    ck = checkpoints.Checkpointing(folder=tmp_path / "checkpoints", keep=3, config="seed: 0\n")
    first = checkpoints.save_sharded(ck, 3, tensors(0), state(), ONE)
    second = checkpoints.save_sharded(ck, 6, tensors(1), state(), ONE)
    assert damage(first) is None and (first / SHARDED / ".metadata").is_file()
    assert not [p for p in ck.folder.iterdir() if p.name.startswith(".")]  # no temp folder left
    into = {k: {n: torch.zeros_like(v) for n, v in part.items()} for k, part in tensors(9).items() if k == "trained"}
    loaded = checkpoints.load_sharded(first, into, one_process=True)
    assert loaded["step"] == 3
    assert all(torch.equal(into["trained"][n], v) for n, v in tensors(0)["trained"].items())

    params = [torch.nn.Parameter(torch.zeros(6, 3)), torch.nn.Parameter(torch.zeros(5))]
    names = ["denoiser.a", "denoiser.b"]
    checkpoints.check_resume(second, params, 6, names=names)
    with pytest.raises(ConfigError, match="this run trains 1"):
        checkpoints.check_resume(second, params[:1], 6, names=names[:1])
    with pytest.raises(ConfigError, match=r"denoiser.b has the shape \(5,\), this run's \(4,\)"):
        checkpoints.check_resume(second, [params[0], torch.nn.Parameter(torch.zeros(4))], 6, names=names)
    with pytest.raises(ConfigError, match="saved sharded .* this run does not shard"):
        checkpoints.check_resume(second, params, 6)

    [data] = (second / SHARDED).glob("*.distcp")
    data.write_bytes(data.read_bytes()[:-8])
    file, reason = damage(second)
    assert file == second / SHARDED and f"truncated data file {data.name}" in reason
    assert newest_intact(ck.folder) == first
    (first / SHARDED / ".metadata").unlink()
    assert damage(first)[1] == "has no .metadata (an interrupted save)"


@pytest.fixture
def world_of_one():
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_sharded_modules_train_as_the_unsharded_and_gather_into_plain_modules_with_tied_weights(world_of_one):
    """``Sharded`` on a U-Net-like stack of blocks with a tied embedding: the same losses and weights as the
    plain module after AdamW steps; ``gather`` gives back plain modules (no DTensor) keeping the tie."""
    from torch.distributed.tensor import DTensor

    from tuner.training.sharding import Sharded, units

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = torch.nn.Linear(8, 8)
            self.register_buffer("scale", torch.tensor(2.0))

        def forward(self, x):
            return torch.tanh(self.inner(x)) * self.scale

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(10, 8)
            self.blocks = torch.nn.ModuleList([Block(), Block()])
            self.head = torch.nn.Linear(8, 10, bias=False)
            self.head.weight = self.embed.weight  # tied

        def forward(self, ids):
            x = self.embed(ids)
            for b in self.blocks:
                x = b(x)
            return self.head(x)

    torch.manual_seed(0)
    plain, sharded_net = Net(), Net()
    sharded_net.load_state_dict(plain.state_dict())
    before = [p for p in sharded_net.parameters()]
    sharded = Sharded({"denoiser": sharded_net}, {"denoiser": ["Block"]}, "no", True, is_main=True)
    params = sharded.parameters(before)
    original = weakref.ref(before[1])
    del before
    gc.collect()
    assert original() is None  # nothing of Sharded's holds the unsharded weights: their memory is freed
    assert len(units(plain, ["Block", "Linear"])) == 3  # the blocks (not the Linears inside them), the head
    assert all(isinstance(p, DTensor) for p in params)
    optimizers = [torch.optim.AdamW(plain.parameters(), lr=1e-2), torch.optim.AdamW(params, lr=1e-2)]
    ids = torch.tensor([[1, 2, 3], [4, 5, 6]])
    for _ in range(3):
        for net, opt in zip((plain, sharded_net), optimizers):
            net(ids).square().mean().backward()
            opt.step()
            opt.zero_grad()
    [(name, whole)] = sharded.gather("cpu").items()
    assert name == "denoiser" and type(whole) is Net
    assert not any(isinstance(p, DTensor) for p in whole.parameters())
    assert whole.head.weight is whole.embed.weight
    assert all(torch.equal(a, b) for a, b in zip(whole.state_dict().values(), plain.state_dict().values()))
    assert torch.equal(whole(ids), plain(ids))


def test_a_planted_metadata_pickle_runs_nothing_and_the_checkpoint_is_named_damaged(tmp_path):
    import pickle

    ck = checkpoints.Checkpointing(folder=tmp_path / "checkpoints", keep=3)
    path = checkpoints.save_sharded(ck, 3, tensors(0), state(), ONE)
    marker = tmp_path / "ran"

    class Planted:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (path / SHARDED / ".metadata").write_bytes(pickle.dumps(Planted()))
    file, reason = damage(path)
    assert file == path / SHARDED and "unreadable .metadata" in reason and "system" in reason
    assert not marker.exists()
    with pytest.raises(ConfigError, match="damaged"):
        checkpoints.check_resume(path, [torch.nn.Parameter(torch.zeros(6, 3))], 6, names=["denoiser.a"])
    assert not marker.exists()
