"""The one place that reaches inside DeepSpeed. Pinned by tests/engine/test_deepspeed_seam.py.

DeepSpeed has no public hook "after gradients are reduced and partitioned, before the update".
The closest public thing is torch's ``Optimizer.register_step_pre_hook`` on the optimizer that
DeepSpeed finally steps: at ZeRO >= 1 that is the *inner* torch optimizer held by DeepSpeed's ZeRO
wrapper as ``.optimizer``, whose params are this rank's fp32 partitions with their reduced gradients
(measured on 0.19.8: single_partition_of_fp32_groups at stage 1/2, fp32_partitioned_groups_flat at 3).
"""

from __future__ import annotations

import torch

TESTED_DEEPSPEED = ("0.19",)


def inner_torch_optimizer(engine) -> torch.optim.Optimizer:
    """The torch optimizer whose step applies the update (the ZeRO wrapper's ``.optimizer`` if any)."""
    from deepspeed.runtime.base_optimizer import DeepSpeedOptimizer

    opt = engine.optimizer
    for _ in range(4):  # ZeRO / BF16 wrappers nest at most once or twice
        if not isinstance(opt, DeepSpeedOptimizer):
            break
        opt = getattr(opt, "optimizer", None)
    if not isinstance(opt, torch.optim.Optimizer):
        import deepspeed

        raise RuntimeError(
            f"dist-dpc cannot find the torch optimizer inside {type(engine.optimizer).__name__} "
            f"(DeepSpeed {deepspeed.__version__}; tested {', '.join(TESTED_DEEPSPEED)}.x): the noise hook "
            "would have nowhere to go. Pin a tested DeepSpeed version.")
    return opt


def zero_stage(engine) -> int:
    return int(engine.zero_optimization_stage())


def partitions_are_disjoint(engine) -> bool:
    """True when each rank's optimizer holds a disjoint shard of the parameters (ZeRO >= 1)."""
    return zero_stage(engine) >= 1
