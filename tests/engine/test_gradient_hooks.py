"""Hooks that see the clipped gradient sum before the noise are refused: hooks on trainable
parameters' gradients (other than DeepSpeed's own) and global optimizer step pre-hooks.

gradient_hooks and global_optimizer_pre_hooks read torch's private hook registries; the first test
fails if a torch version moves them (the refusal would then silently see nothing)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

from dist_dpc.engine import DPEngine, build_ds_config, init_distributed
from dist_dpc.engine.partitioned import whole
from dist_dpc.privacy import GradientHookError, PrivacyConfig
from dist_dpc.privacy.clipper import gradient_hooks, global_optimizer_pre_hooks
from dist_dpc.privacy.randomness import SecretKey

BOUND = 0.1  # lr 0.1, noise 0, 4 samples each clipped to norm <= 1, divided by the expected batch 4


def scale_after_accumulation(param):  # a post-accumulate hook returns None and edits .grad in place
    param.grad.mul_(1000)


def test_the_hook_registries_are_where_torch_keeps_them():
    model = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 1))
    assert gradient_hooks(model) == {} and global_optimizer_pre_hooks() == ()
    first = model[0].weight.register_hook(lambda g: g * 1000)
    second = model[1].bias.register_post_accumulate_grad_hook(scale_after_accumulation)
    third = register_optimizer_step_pre_hook(lambda opt, args, kwargs: None)
    try:
        assert set(gradient_hooks(model)) == {"0.weight", "1.bias"}
        assert gradient_hooks(model)["1.bias"] == (scale_after_accumulation,)
        assert len(global_optimizer_pre_hooks()) == 1
    finally:
        first.remove(), second.remove(), third.remove()
    assert gradient_hooks(model) == {} and global_optimizer_pre_hooks() == ()


def loss_fn(forward, batch):
    return (forward(batch["x"]).squeeze(-1) - batch["y"]) ** 2


def make_engine(model, stage, clipping="per_layer", loss=loss_fn):
    config = build_ds_config({"zero_optimization": {"stage": stage}}, micro_batch_size=4, world_size=1,
                             zero_stage=stage, lr=0.1, weight_decay=0.0, optimizer="sgd", bf16=False)
    privacy = PrivacyConfig(enabled=True, target_epsilon=None, noise_multiplier=0.0, delta=1e-5, max_grad_norm=1.0,
                            clipping=clipping)
    return DPEngine(model, config, privacy, dataset_size=1000, expected_batch_size=4, planned_steps=5,
                    loss_fn=loss, world=init_distributed(), key=SecretKey.from_seed(0))


def batch():
    return {"x": torch.randn(4, 3), "y": 100 * torch.ones(4), "sample_mask": torch.ones(4)}


def weights(engine):
    params = list(engine.ds.module.parameters())
    with whole(params):  # ZeRO 3 holds partitions
        return torch.cat([p.detach().flatten().clone() for p in params])


@pytest.mark.parametrize("clipping", ["per_layer", "flat"])
@pytest.mark.parametrize("stage", [0, 2, 3])
def test_hooks_that_see_the_clipped_sum_are_refused(stage, clipping):
    """A hook multiplying a gradient by 1000 would scale the clipped sum, hence the noise-free
    update, by 1000: refused before the engine is built and, if added later, before each step."""
    model = nn.Sequential(nn.Linear(3, 1))
    handle = model[0].weight.register_hook(lambda g: g * 1000)
    with pytest.raises(GradientHookError, match="0.weight"):
        DPEngine.check_settings(model, {}, PrivacyConfig(enabled=True, noise_multiplier=1.0, target_epsilon=None))
    with pytest.raises(GradientHookError, match="before the noise"):
        make_engine(model, stage, clipping)
    handle.remove()
    engine = make_engine(model, stage, clipping)
    before = weights(engine)
    engine.train_step([batch()], 4)  # DeepSpeed's own hooks are accepted
    assert 0 < (weights(engine) - before).norm() <= BOUND + 1e-6
    param = next(engine.ds.module.parameters())
    for handle in (param.register_hook(lambda g: g * 1000), param.register_post_accumulate_grad_hook(scale_after_accumulation),
                   register_optimizer_step_pre_hook(lambda opt, args, kwargs: [
                       p.grad.mul_(1000) for group in opt.param_groups for p in group["params"]] and None)):
        with pytest.raises(GradientHookError, match="0.weight|global optimizer step pre-hook"):
            engine.train_step([batch()], 4)
        handle.remove()
        assert engine.broken is None  # refused before anything ran: the engine goes on without the hook
    before = weights(engine)
    engine.train_step([batch()], 4)
    assert 0 < (weights(engine) - before).norm() <= BOUND + 1e-6


@pytest.mark.parametrize("stage", [0, 3])
def test_a_hook_added_during_the_step_stops_it_before_the_update(stage):
    model = nn.Sequential(nn.Linear(3, 1))
    handles = []

    def loss_adding_a_hook(forward, micro):
        if not handles:
            handles.append(model[0].weight.register_post_accumulate_grad_hook(scale_after_accumulation))
        return loss_fn(forward, micro)

    engine = make_engine(model, stage, loss=loss_adding_a_hook)
    before = weights(engine)
    with pytest.raises(GradientHookError, match="added during step 1"):
        engine.train_step([batch()], 4)
    assert engine.broken is not None
    assert torch.equal(weights(engine), before), "no update"


def test_replacing_deepspeeds_hook_by_another_is_refused():
    """Same count of hooks, a different callable (whatever id() Python gives it) is refused."""
    model = nn.Sequential(nn.Linear(3, 1))
    engine = make_engine(model, 2)
    store = model[0].weight._post_accumulate_grad_hooks
    assert store, "DeepSpeed's ZeRO 2 reduction hook"
    key, deepspeeds = next(iter(store.items()))

    def scaled(param):
        param.grad.mul_(1000)
        return deepspeeds(param)

    store[key] = scaled
    with pytest.raises(GradientHookError, match="0.weight"):
        engine.train_step([batch()], 4)
    store[key] = deepspeeds
    engine.train_step([batch()], 4)
