"""The engine refuses misused layers in its first train_step, before any parameter changes, at every
ZeRO stage (the bypass self-test runs through the raw module, as flat clipping's norms pass does)."""

from __future__ import annotations

import pytest
import torch

from dist_dpc.engine import DPEngine, build_ds_config, init_distributed
from dist_dpc.privacy import BypassedLayerError, PrivacyConfig, ReusedLayerError
from dist_dpc.privacy.randomness import SecretKey
from tests.layer_use_models import AttentionOutProj, ParentReadsChild, TwiceCalledLinear, misuse_batch, misuse_loss


@pytest.fixture(scope="module")
def world():
    return init_distributed()


def make_engine(world, model, stage: int = 0, clipping: str = "per_layer", bf16: bool = False):
    ds = build_ds_config({"zero_optimization": {"stage3_param_persistence_threshold": 0},
                          "optimizer": {"type": "SGD", "params": {"lr": 10.0}}},
                         micro_batch_size=4, world_size=1, zero_stage=stage, lr=10.0, weight_decay=0.0,
                         optimizer="sgd", bf16=bf16)
    privacy = PrivacyConfig(target_epsilon=None, noise_multiplier=1.0, max_grad_norm=1.0, delta=1e-4, clipping=clipping)
    return DPEngine(model, ds, privacy, dataset_size=1000, expected_batch_size=4, planned_steps=2, loss_fn=misuse_loss,
                    world=world, key=SecretKey.from_seed(0))


def full_params(engine) -> dict[str, torch.Tensor]:
    """Every parameter's stored values; at ZeRO-3 this rank's partition (``ds_tensor``; with one rank,
    all of it), read without a gather: a refused pass may leave ZeRO-3's gather bookkeeping mid-way."""
    if engine.ds.zero_optimization_stage() == 3:
        return {n: p.ds_tensor.detach().clone() for n, p in engine.module.named_parameters()}
    return {n: p.detach().clone() for n, p in engine.module.named_parameters()}


def assert_refused_unchanged(engine, error, match: str) -> None:
    before = full_params(engine)
    with pytest.raises(error, match=match):
        engine.train_step([misuse_batch()], logical_batch_size=4)
    after = full_params(engine)
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert engine.steps_done == 0 and engine.accountant.steps == 0


@pytest.mark.parametrize("clipping", ["per_layer", "flat"])
def test_layer_run_twice_refused_before_any_update(world, clipping):
    engine = make_engine(world, TwiceCalledLinear(), clipping=clipping)
    assert_refused_unchanged(engine, ReusedLayerError, r"shared \(torch.nn.modules.linear.Linear\) ran twice")


@pytest.mark.parametrize("stage", [0, 2, 3])
@pytest.mark.parametrize("build, names", [
    (ParentReadsChild, "child.weight, child.bias"),
    (AttentionOutProj, "attention.out_proj.weight, attention.out_proj.bias"),
])
def test_bypassed_layer_refused_by_self_test(world, build, names, stage):
    """At ZeRO-3 the parameters are partitioned (empty outside a gather); the gradient that reaches
    one through a bypass is still returned by autograd.grad, so it is still detected."""
    engine = make_engine(world, build(), stage=stage)
    assert_refused_unchanged(engine, BypassedLayerError, f": {names}. ")


def test_self_test_runs_once_and_passes_for_sound_models(world):
    model = TwiceCalledLinear()
    model.body = lambda h: torch.tanh(model.shared(h))  # used once: sound
    engine = make_engine(world, model, stage=3)
    before = full_params(engine)
    engine.train_step([misuse_batch()], logical_batch_size=4)
    assert engine._self_tested
    assert any(not torch.equal(before[n], p) for n, p in full_params(engine).items())


def test_flat_clipping_in_bf16_still_refuses_a_bypass(world):
    """flat in bf16 is accepted now (its clip factors keep a rounding margin, tests/privacy/
    test_bf16_clipping.py); a bypassed layer is refused by the self-test as in fp32."""
    engine = make_engine(world, ParentReadsChild(), stage=2, clipping="flat", bf16=True)
    assert_refused_unchanged(engine, BypassedLayerError, ": ")
