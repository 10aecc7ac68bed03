"""The DeepSpeed config: the user's JSON for what we don't own, our fields for what DP owns.

Batch sizes and accumulation are derived from the DP config (micro-steps per logical step vary
under Poisson sampling, so the engine drives the accumulation boundary itself). Anything that
would change gradients behind the DP engine's back is refused before training.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any


class UnsafeDeepSpeedConfig(ValueError):
    """The DeepSpeed config would alter gradients after clipping/noise, voiding the guarantee."""


def read_ds_config(source: dict | str | Path | None) -> dict[str, Any]:
    if source is None:
        return {}
    if isinstance(source, dict):
        return copy.deepcopy(source)
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"train.deepspeed_config={str(source)!r} does not exist")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"train.deepspeed_config={str(source)!r} is not valid JSON: {exc}") from exc


def check_dp_safe(ds: dict[str, Any], dp_enabled: bool = True) -> None:
    """Refuse settings that clip, scale or otherwise change gradients behind the DP engine."""
    if not dp_enabled:
        return
    problems = []
    if float(ds.get("gradient_clipping", 0) or 0) > 0:
        problems.append(f"gradient_clipping={ds['gradient_clipping']} (DeepSpeed would clip the noisy sum again, "
                        "after the per-sample clipping; set it to 0 and use privacy.max_grad_norm)")
    if ds.get("prescale_gradients"):
        problems.append("prescale_gradients=true (set it to false)")
    if float(ds.get("gradient_predivide_factor", 1.0)) != 1.0:
        problems.append(f"gradient_predivide_factor={ds['gradient_predivide_factor']} (remove it: the engine scales by the expected batch size)")
    if (ds.get("fp16") or {}).get("enabled"):
        problems.append("fp16.enabled=true (dynamic loss scaling changes the gradient scale inside the clipped "
                        "backward; use bf16 or fp32)")
    if (ds.get("amp") or {}).get("enabled"):
        problems.append("amp.enabled=true (use bf16 or fp32)")
    zero = ds.get("zero_optimization") or {}
    if zero.get("stage", 0) not in (0, 1, 2, 3):
        problems.append(f"zero_optimization.stage={zero.get('stage')} (allowed: 0, 1, 2, 3)")
    if (ds.get("data_efficiency") or {}).get("enabled"):
        problems.append("data_efficiency.enabled=true (curriculum/random-LTD sampling breaks the Poisson sampling the accounting assumes)")
    if problems:
        raise UnsafeDeepSpeedConfig("the DeepSpeed config would change gradients behind the DP engine: "
                                    + "; ".join(problems))


_OWNED = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")


def build_ds_config(user: dict | str | Path | None, *, micro_batch_size: int, world_size: int, zero_stage: int | None,
                    lr: float, weight_decay: float, optimizer: str, bf16: bool, dp_enabled: bool = True,
                    momentum: float = 0.0) -> dict[str, Any]:
    ds = read_ds_config(user)
    for key in _OWNED:
        value = ds.get(key)
        if value not in (None, "auto"):
            derived = {"train_micro_batch_size_per_gpu": micro_batch_size, "gradient_accumulation_steps": 1,
                       "train_batch_size": micro_batch_size * world_size}[key]
            if value != derived:
                raise ValueError(f"DeepSpeed config sets {key}={value}: batch sizes are derived by dist-dpc; remove it "
                                 "and set train.batch_size (expected logical batch) and train.micro_batch_size instead")
    # Poisson sampling makes the number of micro-steps vary per step: the engine marks the
    # accumulation boundary itself, so DeepSpeed sees one micro-batch per "batch".
    ds["train_micro_batch_size_per_gpu"] = micro_batch_size
    ds["gradient_accumulation_steps"] = 1
    ds["train_batch_size"] = micro_batch_size * world_size
    zero = ds.setdefault("zero_optimization", {})
    if zero_stage is not None:
        zero["stage"] = zero_stage
    zero.setdefault("stage", 0)
    if "optimizer" not in ds:
        if optimizer == "adamw":
            ds["optimizer"] = {"type": "AdamW", "params": {"lr": lr, "weight_decay": weight_decay, "torch_adam": True}}
        else:
            ds["optimizer"] = {"type": "SGD", "params": {"lr": lr, "weight_decay": weight_decay, "momentum": momentum}}
    if str(ds["optimizer"].get("type", "")).lower() == "sgd":
        # torch SGD under ZeRO is plain elementwise maths on the fp32 partition; DeepSpeed only
        # asks for this flag because it did not write the optimizer.
        ds.setdefault("zero_allow_untested_optimizer", True)
    bf16_section = ds.setdefault("bf16", {})
    if bf16_section.get("enabled") == "auto":
        # Templates say "auto": bf16 where the GPU has it, fp32 on CPU.
        import torch

        bf16_section["enabled"] = bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    if bf16:
        bf16_section["enabled"] = True
    ds.setdefault("steps_per_print", 10**9)  # our own logging reports progress
    ds.setdefault("gradient_clipping", 0.0)
    check_dp_safe(ds, dp_enabled)
    return ds
