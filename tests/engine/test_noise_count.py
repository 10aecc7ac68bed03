"""The noise hook counts what it noises: a coordinate stepped without noise stops the run, on real
DeepSpeed engines (one process; the two-rank noise statistics are in test_noise_and_comms)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from dist_dpc.engine import DPEngine, build_ds_config, init_distributed
from dist_dpc.engine.losses import sequence_classification_loss
from dist_dpc.models import ModelConfig, load_sequence_classifier
from dist_dpc.privacy import PrivacyConfig
from dist_dpc.privacy.randomness import SecretKey


def make_engine(stage: int) -> DPEngine:
    model = load_sequence_classifier(ModelConfig(name="tiny-bert", dropout=0.0), num_labels=2)
    ds = build_ds_config({"zero_optimization": {"stage3_param_persistence_threshold": 0, "sub_group_size": 2000}},
                         micro_batch_size=4, world_size=1, zero_stage=stage, lr=1e-2, weight_decay=0.0,
                         optimizer="sgd", bf16=False)
    return DPEngine(model, ds, PrivacyConfig(target_epsilon=None, noise_multiplier=1.0, delta=1e-4),
                    dataset_size=1000, expected_batch_size=4, planned_steps=5, loss_fn=sequence_classification_loss,
                    world=init_distributed(), key=SecretKey.generate())


def batch():
    return [{"input_ids": torch.randint(1, 100, (4, 6)), "attention_mask": torch.ones(4, 6, dtype=torch.long),
             "labels": torch.tensor([0, 1, 0, 1]), "sample_mask": torch.ones(4)}]


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_a_normal_step_noises_exactly_the_partition(stage):
    engine = make_engine(stage)
    total = sum(p.numel() for p in engine.module.parameters()) if stage < 3 else None
    engine.train_step(batch(), 4)
    assert engine._noised_numel == engine.partition_numel > 0
    if stage == 0:
        assert engine.partition_numel == total
    if stage == 3:  # sub_group_size 2000 splits the flat partition: one hook call per sub-group
        assert engine._hook_calls == len(engine._partitions) > 1


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_a_partition_without_gradient_stops_before_the_update(stage):
    """The hook reached directly with one partition tensor's gradient missing (inside a real step
    only a global optimizer pre-hook could drop it, and the engine refuses those: test_gradient_hooks)."""
    engine = make_engine(stage)
    params = engine._partitions
    for p in params:
        p.grad = torch.zeros_like(p)
    params[-1].grad = None
    engine._stepping = True  # as inside train_step's optimizer step
    with pytest.raises(RuntimeError, match="has no gradient at the step.*Stopping before the update"):
        engine._noise_and_normalise(SimpleNamespace(param_groups=[{"params": params}]), (), {})


@pytest.mark.parametrize("stage", [0, 2])
def test_a_partial_parameter_list_is_a_count_mismatch(stage):
    engine = make_engine(stage)
    params = engine._partitions
    for p in params:
        p.grad = torch.zeros_like(p)
    partial = SimpleNamespace(param_groups=[{"params": params[:-1]}])  # one tensor short (ZeRO-2: none at all)
    noised = sum(p.numel() for p in params[:-1])
    engine._stepping = True  # as inside train_step's optimizer step (outside it the hook refuses any call)
    with pytest.raises(RuntimeError, match=rf"{noised} elements were noised at step 0 but this rank's "
                                           rf"optimizer partition has {engine.partition_numel}, stopping before"):
        engine._noise_and_normalise(partial, (), {})


def test_zero3_sub_group_stepped_elsewhere_is_caught_after_the_step():
    # What offload_optimizer.ratio < 1 does: a sub-group of this rank's partition is stepped by a
    # backup optimizer, so the hook is called once less than there are sub-groups and never sees it.
    engine = make_engine(3)
    stepped_elsewhere = torch.zeros(10)
    engine._partitions.append(stepped_elsewhere)
    engine.partition_numel += stepped_elsewhere.numel()
    with pytest.raises(RuntimeError, match=r"elements were noised at step 0 .* after the step .* ZenFlow"):
        engine.train_step(batch(), 4)


def test_partitions_must_cover_every_trainable_parameter():
    engine = make_engine(2)
    with pytest.raises(RuntimeError, match="some coordinates would be updated without DP noise"):
        engine._check_partitions_cover(engine.partition_numel + 1)
    engine0 = make_engine(0)
    with pytest.raises(RuntimeError, match="at ZeRO 0 every rank must hold all of them"):
        engine0._check_partitions_cover(engine0.partition_numel + 1)
