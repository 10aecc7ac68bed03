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
    """For each fp32 tensor this rank's optimizer steps (hooked_partitions), a bool mask of its
    coordinates: False where ``masks`` ({id(module parameter): bool mask of its shape}) prunes, True elsewhere.

    DeepSpeed maps parameters onto flat partitions in ways that differ by stage and precision; rather
    than reading its private maps, the masks are pushed through its public API: every trainable
    parameter's fp32 master is set to its mask (1 for unmasked parameters and for ZeRO-3's padding)
    with safe_set_full_fp32_param (ZeRO 1/2) or safe_set_local_fp32_param (ZeRO 3, this rank's padded
    slice), this rank's partitions are read, and the masters are restored from a copy of those
    partitions (1/world of the model). Checked before training: summed over ranks exactly the kept
    coordinates read 1 (nothing missed or mapped twice), and every coordinate read as pruned holds a
    zero master (the pruned weights were zeroed before DeepSpeed copied them), which a shifted or
    permuted mapping would break. Needs disjoint partitions (ZeRO >= 1)."""
    from deepspeed.utils import safe_get_local_fp32_param, safe_set_full_fp32_param, safe_set_local_fp32_param

    if not partitions_are_disjoint(engine):
        raise ValueError("pruning masks in bf16 need train.zero_stage >= 1 (at ZeRO 0 DeepSpeed's bf16 optimizer keeps "
                         "no per-parameter map to its fp32 copy): set train.zero_stage=1 (or 2, 3), or train.bf16=false")
    partitions = hooked_partitions(engine)
    trainable = [p for p in engine.module.parameters() if p.requires_grad]
    unknown = set(masks) - {id(p) for p in trainable}
    if unknown:
        raise ValueError(f"{len(unknown)} pruning mask(s) name no trainable parameter of the engine's module")
    saved = [t.detach().clone() for t in partitions]
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    device = partitions[0].device
    expected_kept = 0
    try:
        for p in trainable:
            mask = masks.get(id(p))
            if hasattr(p, "ds_id"):  # ZeRO 3: this rank's slice of the flattened, padded parameter
                numel, per_rank = p.ds_numel, safe_get_local_fp32_param(p).numel()
                marker = torch.ones(per_rank * world, dtype=torch.float32)
                if mask is not None:
                    marker[:numel] = mask.reshape(-1).float()
                expected_kept += int(marker.sum())
                safe_set_local_fp32_param(p, marker.narrow(0, per_rank * rank, per_rank).to(device))
            else:
                marker = torch.ones(p.shape, dtype=torch.float32) if mask is None else mask.reshape(p.shape).float()
                expected_kept += int(marker.sum())
                safe_set_full_fp32_param(p, marker.to(device))
        out = {id(t): t.detach() == 1 for t in partitions}  # bool: one byte a coordinate of the partition
    finally:
        markers = [t.detach().clone() for t in partitions]
        for t, copy in zip(partitions, saved):
            t.data.copy_(copy)
    # int64 on the engine's device: exact at any size, and a collective NCCL can run.
    counts = torch.tensor([sum(int(m.sum()) for m in out.values()),
                           sum(int(((copy != 0) & (marker == 0)).sum()) for copy, marker in zip(saved, markers))],
                          dtype=torch.int64, device=engine.device)
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(counts)
    kept, nonzero_pruned = (int(x) for x in counts.tolist())
    if kept != expected_kept or nonzero_pruned:
        raise RuntimeError(f"pruning masks could not follow DeepSpeed's partitions (ZeRO stage {zero_stage(engine)}): "
                           f"{kept} coordinates read as kept across ranks ({expected_kept} expected), {nonzero_pruned} "
                           f"read as pruned hold a non-zero weight (DeepSpeed tested: {', '.join(TESTED_DEEPSPEED)}.x). "
                           "Stopping before training")
    return out
