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


def hooked_partitions(engine) -> list[torch.Tensor]:
    """Every fp32 tensor the hooked optimizer steps in one whole step on this rank.

    At ZeRO 0-2 they are the inner optimizer's params. ZeRO-3 swaps one sub-group's flat partition
    into the inner optimizer per ``step()`` and empties its param groups in between, so they are read
    from the ZeRO-3 optimizer's ``fp32_partitioned_groups_flat`` (pinned by test_deepspeed_seam)."""
    if zero_stage(engine) == 3:
        flats = getattr(engine.optimizer, "fp32_partitioned_groups_flat", None)
        if flats is None:
            raise RuntimeError("DeepSpeed's ZeRO-3 optimizer has no fp32_partitioned_groups_flat (tested on "
                               f"{', '.join(TESTED_DEEPSPEED)}.x): the noise hook cannot check what it noises")
        return list(flats)
    return [p for group in inner_torch_optimizer(engine).param_groups for p in group["params"]]
