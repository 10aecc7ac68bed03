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


@torch.no_grad()
def partition_masks(engine, masks: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
    """For each fp32 tensor this rank's optimizer steps (hooked_partitions), a 0/1 mask of its
    coordinates: 0 where ``masks`` ({id(module parameter): bool mask of its shape}) prunes, 1 elsewhere.

    DeepSpeed maps parameters onto flat partitions in ways that differ by stage and precision; rather
    than reading its private maps, the masks are pushed through its public API: every trainable
    parameter's fp32 master is set (safe_set_full_fp32_param, ZeRO 1-3 and bf16) to its mask (1 for
    unmasked parameters), this rank's partitions are read, and the masters are restored from a copy of
    those partitions (1/world of the model). Checked: summed over ranks, exactly the kept coordinates
    read 1, so no coordinate was missed or mapped twice."""
    from deepspeed.utils import safe_set_full_fp32_param

    partitions = hooked_partitions(engine)
    saved = [t.detach().clone() for t in partitions]
    trainable = [p for p in engine.module.parameters() if p.requires_grad]
    expected_kept = 0
    for p in trainable:
        shape = tuple(getattr(p, "ds_shape", p.shape))  # ZeRO-3 keeps the full shape here
        mask = masks.get(id(p))
        marker = torch.ones(shape, dtype=torch.float32) if mask is None else mask.reshape(shape).float()
        expected_kept += int(marker.sum())
        safe_set_full_fp32_param(p, marker.to(partitions[0].device))
    out = {id(t): (t.detach() == 1).to(t.dtype) for t in partitions}
    kept = torch.tensor([float(sum(int(m.sum()) for m in out.values()))])
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(kept)
    for t, copy in zip(partitions, saved):
        t.data.copy_(copy)
    if int(kept.item()) != expected_kept:
        raise RuntimeError(f"pruning masks could not follow DeepSpeed's partitions (ZeRO stage {zero_stage(engine)}): "
                           f"{int(kept.item())} coordinates marked as kept across ranks, {expected_kept} expected "
                           f"(DeepSpeed tested: {', '.join(TESTED_DEEPSPEED)}.x). Stopping before training")
    return out
