"""A frozen model (DPKD's teacher) partitioned like the model that trains: ZeRO-3 inference.

DeepSpeed's ``initialize`` without an optimizer at ZeRO stage 3 partitions the parameters over the
ranks and gathers each layer's parameters only for its forward (ZeRO-Inference), so a teacher costs
each rank 1/world of its weights plus one layer at a time, and no optimizer state. Its forward is a
collective: every rank must call it the same number of times, in the same order (the DP engine's
samplers give every rank the same number of micro-batches; head_init pads its passes to match).
"""

from __future__ import annotations

import torch
from torch import nn

from dist_dpc.engine.ds_config import config_zero_stage, fill_width_autos, model_width


# How many gathered parameters ZeRO 3 keeps live, and what it prefetches: the training config's
# choice applies to the frozen model too (DeepSpeed's defaults keep up to 1e9 elements gathered).
GATHER_SETTINGS = ("stage3_max_live_parameters", "stage3_max_reuse_distance", "stage3_prefetch_bucket_size")


def partition_frozen(module: nn.Module, *, micro_batch_size: int, bf16: bool, zero: dict | None = None) -> nn.Module:
    """``module`` frozen, in eval mode, its parameters partitioned over the ranks (ZeRO 3); call it as
    before. ``zero``: the training config's zero_optimization block, whose gather settings
    (GATHER_SETTINGS; "auto" sized from the frozen model's width) the frozen model follows too. The
    DeepSpeed engine that owns the partitioning is kept on the module (``ds_inference``)."""
    import deepspeed

    module.requires_grad_(False).eval()
    inherited = {k: v for k, v in (zero or {}).items() if k in GATHER_SETTINGS}
    config = {"train_micro_batch_size_per_gpu": micro_batch_size, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0, **inherited},
              "bf16": {"enabled": bool(bf16)}}
    config = fill_width_autos(config, model_width(module))  # "auto" sized from the frozen model's own width
    engine, *_ = deepspeed.initialize(model=module, config=config)
    engine.eval()
    inner = engine.module
    inner.ds_inference = (engine,)  # a tuple: not a registered submodule, but kept alive with the module
    return inner


def place_frozen(module: nn.Module, ds_config: dict, device: torch.device) -> nn.Module:
    """``module`` frozen and placed like the model that trains under ``ds_config`` (a built DeepSpeed
    config): partitioned over the ranks at ZeRO 3 (partition_frozen, with the config's gather
    settings), else whole on ``device``; in bf16 when the config trains in bf16, at every stage, so
    that its outputs do not depend on the stage and a whole copy costs 2 bytes a weight."""
    bf16 = bool(ds_config.get("bf16", {}).get("enabled"))
    if config_zero_stage(ds_config) == 3:
        return partition_frozen(module, micro_batch_size=ds_config["train_micro_batch_size_per_gpu"], bf16=bf16,
                                zero=ds_config["zero_optimization"])
    return module.requires_grad_(False).eval().to(device, dtype=torch.bfloat16 if bf16 else None)


@torch.no_grad()
def local_numel(module: nn.Module) -> int:
    """Elements of ``module``'s parameters held on this rank outside a forward (its ZeRO-3 partitions)."""
    return sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in module.parameters())
