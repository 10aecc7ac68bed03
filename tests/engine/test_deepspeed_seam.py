"""Pins the one DeepSpeed internal the engine relies on: where the optimizer's fp32 partitions live.

If a DeepSpeed upgrade moves them, this fails loudly instead of the noise silently landing nowhere.
"""

from __future__ import annotations

import deepspeed
import pytest
import torch

from dist_dpc.engine import build_ds_config, init_distributed
from dist_dpc.engine.deepspeed_seam import inner_torch_optimizer, partitions_are_disjoint
from dist_dpc.models import ModelConfig, load_sequence_classifier

# Attribute holding each param group's fp32 partition, per ZeRO stage, as measured on DeepSpeed 0.19.
PARTITION_ATTR = {1: "single_partition_of_fp32_groups", 2: "single_partition_of_fp32_groups",
                  3: "fp32_partitioned_groups_flat"}


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_inner_optimizer_holds_this_ranks_fp32_partitions(stage):
    init_distributed()
    model = load_sequence_classifier(ModelConfig(name="tiny-bert"), num_labels=2)
    config = build_ds_config({"zero_optimization": {"stage3_param_persistence_threshold": 0}}, micro_batch_size=2,
                             world_size=1, zero_stage=stage, lr=1e-3, weight_decay=0.0, optimizer="adamw", bf16=False)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=list(model.parameters()), config=config)
    inner = inner_torch_optimizer(engine)
    assert isinstance(inner, torch.optim.Optimizer)
    seen = []  # per hook call: (param ids, all have a gradient, all fp32)
    inner.register_step_pre_hook(lambda opt, a, k: seen.append((
        [id(p) for g in opt.param_groups for p in g["params"]],
        all(p.grad is not None for g in opt.param_groups for p in g["params"]),
        all(p.dtype == torch.float32 for g in opt.param_groups for p in g["params"]))))
    out = engine(input_ids=torch.randint(1, 50, (2, 5)), labels=torch.tensor([0, 1]))
    engine.backward(out.loss)
    engine.step()
    assert seen, "the step pre-hook never ran"
    hooked = [i for ids, _, _ in seen for i in ids]
    assert all(has_grad and fp32 for _, has_grad, fp32 in seen), "pre-hook must see reduced fp32 gradients"
    assert len(hooked) == len(set(hooked)), "a partition was presented twice in one step (would be noised twice)"
    if stage == 0:
        assert inner is engine.optimizer
        assert set(hooked) == {id(p) for p in model.parameters()}
        assert not partitions_are_disjoint(engine)
    else:
        # ZeRO-3 swaps one sub-group's flat partition into the inner optimizer per step() call.
        partitions = getattr(engine.optimizer, PARTITION_ATTR[stage])
        assert set(hooked) == {id(p) for p in partitions}
        assert partitions_are_disjoint(engine)
