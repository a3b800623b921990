"""``train.fused_backward``: each trained tensor steps as its gradient arrives and the gradient is freed then.
The weights are those of the ordinary step; resuming is exact; what cannot work with it is refused."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import train_in_process
from tuner.compose import compose
from tuner.errors import ConfigError
from tuner.training.optim import FusedBackward, make_optimizer


@pytest.mark.parametrize("name", ["adamw", "adamw8bit", "sgd"])
def test_each_tensor_steps_as_its_gradient_arrives_and_the_gradient_is_freed(name):
    torch.manual_seed(0)

    def net():
        return torch.nn.Sequential(
            torch.nn.Linear(64, 64), torch.nn.GELU(), torch.nn.Linear(64, 64), torch.nn.Linear(64, 3)
        )

    def groups(m):  # two groups, the first with a learning rate of its own
        return [{"params": list(m[0].parameters()), "lr": 1e-2}, {"params": [*m[2].parameters(), *m[3].parameters()]}]

    model, twin = net(), net()
    twin.load_state_dict(model.state_dict())
    fused = FusedBackward(name, groups(model), 1e-3, 0.01)
    plain = make_optimizer(name, groups(twin), 1e-3, 0.01)
    held = []  # how many gradients exist each time one is complete (hooks run after the optimizer's)
    params = list(model.parameters())
    for p in params:
        p.register_post_accumulate_grad_hook(lambda p: held.append(sum(q.grad is not None for q in params)))
    x = torch.randn(8, 64)
    for _ in range(3):
        model(x).square().mean().backward()
        fused.step()
        twin(x).square().mean().backward()
        plain.step()
        plain.zero_grad()
    assert held and max(held) == 0  # every gradient freed as soon as its step was taken
    for (key, a), b in zip(model.state_dict().items(), twin.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=key)
    assert [g["lr"] for g in fused.param_groups][:2] == [1e-2, 1e-2]  # each tensor keeps its group's settings
    fused.remove()


@pytest.mark.parametrize("method", [pytest.param("adapter=full", marks=pytest.mark.e2e), "adapter=partial_unet"])
def test_a_fused_backward_fine_tune_ends_with_the_weights_of_the_ordinary_one(tmp_path, tiny_pipeline_dir, method):
    settings = [method, "train.max_grad_norm=0", "export.formats=[merged]", "train.max_steps=4"]
    plain = train_in_process(tmp_path, tiny_pipeline_dir, *settings, name="plain")
    fused = train_in_process(tmp_path, tiny_pipeline_dir, *settings, "train.fused_backward=true", name="fused")
    a, b = plain.components.unet.state_dict(), fused.components.unet.state_dict()
    moved = sum(1 for p in plain.components.unet.parameters() if p.requires_grad)
    assert moved > 0
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6, msg=key)
    assert fused.metrics["train_loss"] == pytest.approx(plain.metrics["train_loss"], rel=1e-5)
    assert not any(p._post_accumulate_grad_hooks for p in fused.components.unet.parameters())


@pytest.mark.e2e
def test_a_fused_backward_run_resumes_exactly(tmp_path, tiny_pipeline_dir):
    settings = ["adapter=partial_unet", "train.max_grad_norm=0", "train.fused_backward=true", "train.max_steps=4"]
    whole = train_in_process(tmp_path, tiny_pipeline_dir, *settings, "checkpoints.every=2", name="whole")
    step2 = whole.dir / "checkpoints" / "step-0000002"
    resumed = train_in_process(tmp_path, tiny_pipeline_dir, *settings, f"resume={step2}", name="resumed")
    for key, value in whole.components.unet.state_dict().items():
        assert torch.equal(resumed.components.unet.state_dict()[key], value), key
    with pytest.raises(ConfigError, match=r"train\.fused_backward=true.*this run has train\.fused_backward=false"):
        train_in_process(tmp_path, tiny_pipeline_dir, *settings[:-2], "train.max_steps=4", f"resume={step2}", name="x")


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["train.fused_backward=true"], r"fused_backward=true needs train\.max_grad_norm=0"),
        (
            ["train.fused_backward=true", "train.max_grad_norm=0", "train.gradient_accumulation_steps=2"],
            "gradient_accumulation_steps=1",
        ),
        (["train.fused_backward=true", "train.max_grad_norm=0", "train.optimizer=prodigy"], "prodigy"),
    ],
)
def test_what_needs_every_gradient_at_once_is_refused_with_fused_backward(overrides, match):
    from tuner.checks import validate

    with pytest.raises(ConfigError, match=match):
        validate(compose("quickstart", overrides))
