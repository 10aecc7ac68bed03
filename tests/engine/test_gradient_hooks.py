"""Hooks on trainable parameters' gradients run on the clipped sum before the noise: refused.

gradient_hooks reads torch's private Tensor._backward_hooks and _post_accumulate_grad_hooks; the
first test fails if a torch version moves them (the refusal would then silently see nothing)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dist_dpc.engine import DPEngine, build_ds_config, init_distributed
from dist_dpc.engine.partitioned import whole
from dist_dpc.privacy import GradientHookError, PrivacyConfig
from dist_dpc.privacy.clipper import gradient_hooks
from dist_dpc.privacy.randomness import SecretKey


def test_gradient_hooks_sees_both_kinds_of_public_registration():
    model = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 1))
    assert gradient_hooks(model) == {}
    first = model[0].weight.register_hook(lambda g: g * 1000)
    second = model[1].bias.register_post_accumulate_grad_hook(lambda p: p.grad.mul_(1000))
    assert set(gradient_hooks(model)) == {"0.weight", "1.bias"}
    first.remove()
    second.remove()
    assert gradient_hooks(model) == {}


def loss_fn(forward, batch):
    return (forward(batch["x"]).squeeze(-1) - batch["y"]) ** 2


def make_engine(model, stage):
    config = build_ds_config({"zero_optimization": {"stage": stage}}, micro_batch_size=4, world_size=1,
                             zero_stage=stage, lr=0.1, weight_decay=0.0, optimizer="sgd", bf16=False)
    privacy = PrivacyConfig(enabled=True, target_epsilon=None, noise_multiplier=0.0, delta=1e-5, max_grad_norm=1.0)
    return DPEngine(model, config, privacy, dataset_size=1000, expected_batch_size=4, planned_steps=5,
                    loss_fn=loss_fn, world=init_distributed(), key=SecretKey.from_seed(0))


BATCH = {"x": torch.randn(4, 3), "y": 100 * torch.ones(4), "sample_mask": torch.ones(4)}


def weights(engine):
    params = list(engine.ds.module.parameters())
    with whole(params):  # ZeRO 3 holds partitions
        return [p.detach().clone() for p in params]


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_a_hook_that_scales_the_clipped_sum_is_refused(stage):
    """A hook multiplying a gradient by 1000 would move the weights 1000 times further than
    max_grad_norm allows: refused before the engine is built and, if added later, before each step."""
    model = nn.Sequential(nn.Linear(3, 1))
    handle = model[0].weight.register_hook(lambda g: g * 1000)
    with pytest.raises(GradientHookError, match="0.weight"):
        DPEngine.check_settings(model, {}, PrivacyConfig(enabled=True, noise_multiplier=1.0, target_epsilon=None))
    with pytest.raises(GradientHookError, match="before the noise"):
        make_engine(model, stage)
    handle.remove()
    engine = make_engine(model, stage)
    before = weights(engine)
    engine.train_step([BATCH], 4)  # DeepSpeed's own hooks are accepted
    moved = weights(engine)
    # noise 0, lr 0.1, 4 samples each clipped to norm <= 1, divided by 4: the update's norm is <= 0.1
    step = torch.cat([(a - b).flatten() for a, b in zip(moved, before)]).norm()
    assert 0 < step <= 0.1 + 1e-6
    for kind in ("register_hook", "register_post_accumulate_grad_hook"):
        param = next(engine.ds.module.parameters())
        handle = (param.register_hook(lambda g: g * 1000) if kind == "register_hook"
                  else param.register_post_accumulate_grad_hook(lambda p: p.grad.mul_(1000)))
        with pytest.raises(GradientHookError, match="0.weight"):
            engine.train_step([BATCH], 4)
        handle.remove()
        assert engine.broken is None  # refused before anything ran: the engine goes on without the hook
    engine.train_step([BATCH], 4)
