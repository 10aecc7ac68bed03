"""The DeepSpeed config: the user's JSON for what we don't own, our fields for what DP owns.

Batch sizes and accumulation are derived from the DP config (micro-steps per logical step vary
under Poisson sampling, so the engine drives the accumulation boundary itself). Anything that
would change gradients behind the DP engine's back is refused before training, and so is any key
outside the allow-list of settings the engine is tested with (``ALLOWED``).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any


def config_zero_stage(ds_config: dict) -> int:
    """The ZeRO stage a DeepSpeed config asks for (0 when it names none)."""
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


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


ANY = None  # a key whose value does not touch gradients (checked elsewhere, or free)

# The DeepSpeed settings the DP engine is tested with (ds_configs/ and tests/engine). Anything else
# is refused: DeepSpeed has paths that update or rescale coordinates outside the optimizer the noise
# hook sits on (ZeRO-3 offload ratio < 1 steps a backup optimizer, ZenFlow selective updates,
# torch_autocast's grad scaler), and a new version may add more. A dict is a nested block, a tuple the
# allowed values (strings compared case-insensitively), ANY any value. Bucket and prefetch sizes only
# change how the same sums are communicated; the per-step noise count in DPEngine is the backstop.
_OFFLOAD_DEVICE = ("cpu", "none")
ALLOWED: dict[str, Any] = {
    "train_batch_size": ANY, "train_micro_batch_size_per_gpu": ANY, "gradient_accumulation_steps": ANY,
    "zero_optimization": {
        "stage": (0, 1, 2, 3), "overlap_comm": ANY, "contiguous_gradients": ANY, "reduce_scatter": ANY,
        "reduce_bucket_size": ANY, "allgather_partitions": ANY, "allgather_bucket_size": ANY,
        "stage3_param_persistence_threshold": ANY, "stage3_gather_16bit_weights_on_model_save": ANY,
        "stage3_max_live_parameters": ANY, "stage3_max_reuse_distance": ANY, "stage3_prefetch_bucket_size": ANY,
        "sub_group_size": ANY,
        "offload_optimizer": {"device": _OFFLOAD_DEVICE, "pin_memory": ANY, "ratio": (1,), "buffer_count": ANY,
                              "fast_init": ANY},
        "offload_param": {"device": _OFFLOAD_DEVICE, "pin_memory": ANY, "buffer_count": ANY, "buffer_size": ANY,
                          "max_in_cpu": ANY},
    },
    "bf16": {"enabled": (True, False, "auto")},
    "fp16": {"enabled": ANY}, "amp": {"enabled": ANY},  # enabled=true refused below, with the reason
    "optimizer": {"type": ("adam", "adamw", "sgd"),
                  "params": {"lr": ANY, "betas": ANY, "eps": ANY, "weight_decay": ANY, "torch_adam": ANY,
                             "adam_w_mode": ANY, "momentum": ANY, "dampening": ANY, "nesterov": ANY}},
    "scheduler": {"type": ("warmuplr", "warmupdecaylr", "warmupcosinelr", "onecycle", "lrrangetest"), "params": ANY},
    "zero_allow_untested_optimizer": ANY,  # torch SGD under ZeRO (see build_ds_config)
    "gradient_clipping": ANY, "prescale_gradients": ANY, "gradient_predivide_factor": ANY,  # checked below
    "data_efficiency": {"enabled": ANY},  # enabled=true refused below
    "steps_per_print": ANY, "wall_clock_breakdown": ANY,
    # How checkpoint tags are validated across ranks; no gradient is touched. (load_universal is set
    # by dist-dpc itself for a resume on another number of ranks, pipeline/checkpoints.py.)
    "checkpoint": {"tag_validation": ANY},
    "comms_logger": {"enabled": ANY, "verbose": ANY, "prof_all": ANY, "prof_ops": ANY, "debug": ANY},
}


def check_dp_safe(ds: dict[str, Any], dp_enabled: bool = True) -> None:
    """Refuse settings that clip, scale, or update coordinates behind the DP engine: first the known
    hazards with their reason and fix, then anything outside the tested allow-list ``ALLOWED``."""
    if not dp_enabled:
        return
    problems = _known_hazards(ds)
    _check_allowed(ds, ALLOWED, "", problems)
    if problems:
        raise UnsafeDeepSpeedConfig("the DeepSpeed config would change gradients behind the DP engine: "
                                    + "; ".join(problems.values()))


def _known_hazards(ds: dict[str, Any]) -> dict[str, str]:
    """Dotted key -> why it is refused and what to do instead."""
    problems = {}
    if float(ds.get("gradient_clipping", 0) or 0) > 0:
        problems["gradient_clipping"] = (f"gradient_clipping={ds['gradient_clipping']} (DeepSpeed would clip the "
                                         "noisy sum again, after the per-sample clipping; set it to 0 and use "
                                         "privacy.max_grad_norm)")
    if ds.get("prescale_gradients"):
        problems["prescale_gradients"] = "prescale_gradients=true (set it to false)"
    if float(ds.get("gradient_predivide_factor", 1.0)) != 1.0:
        problems["gradient_predivide_factor"] = (f"gradient_predivide_factor={ds['gradient_predivide_factor']} "
                                                 "(remove it: the engine scales by the expected batch size)")
    if (ds.get("fp16") or {}).get("enabled"):
        problems["fp16"] = ("fp16.enabled=true (dynamic loss scaling changes the gradient scale inside the clipped "
                            "backward; use bf16 or fp32)")
    if (ds.get("amp") or {}).get("enabled"):
        problems["amp"] = "amp.enabled=true (use bf16 or fp32)"
    if "torch_autocast" in ds:
        problems["torch_autocast"] = ("torch_autocast (DeepSpeed's autocast path steps through its own grad scaler "
                                      "and is not verified with the noise hook; remove the block and use "
                                      "bf16.enabled)")
    zero = ds.get("zero_optimization") or {}
    if zero.get("stage", 0) not in (0, 1, 2, 3):
        problems["zero_optimization.stage"] = f"zero_optimization.stage={zero.get('stage')} (allowed: 0, 1, 2, 3)"
    if "zenflow" in zero:
        problems["zero_optimization.zenflow"] = ("zero_optimization.zenflow (ZenFlow updates selected coordinates "
                                                 "outside the hooked optimizer, without DP noise; remove it)")
    ratio = (zero.get("offload_optimizer") or {}).get("ratio", 1)
    if float(ratio) != 1.0:
        problems["zero_optimization.offload_optimizer.ratio"] = (
            f"zero_optimization.offload_optimizer.ratio={ratio} (below 1, ZeRO-3 steps part of the parameters with "
            "a backup optimizer the noise hook never sees; remove it or set it to 1)")
    if (ds.get("data_efficiency") or {}).get("enabled"):
        problems["data_efficiency"] = ("data_efficiency.enabled=true (curriculum/random-LTD sampling breaks the "
                                       "Poisson sampling the accounting assumes)")
    return problems


def _check_allowed(block: dict[str, Any], allowed: dict[str, Any], prefix: str, problems: dict[str, str]) -> None:
    """Add a problem for every key (at any depth) or value outside ``allowed``, unless already explained."""
    where = f" in {prefix[:-1]}" if prefix else ""
    for key, value in block.items():
        name = prefix + key
        if name in problems:
            continue
        if key not in allowed:
            problems[name] = (f"{name} (not a DeepSpeed setting the DP engine is tested with; it could update or "
                              f"rescale coordinates outside the noise hook. Allowed{where}: "
                              f"{', '.join(allowed)})")
            continue
        rule = allowed[key]
        if isinstance(rule, dict):
            if isinstance(value, dict):
                _check_allowed(value, rule, name + ".", problems)
            else:
                problems[name] = f"{name}={value!r} (must be a JSON object with keys among: {', '.join(rule)})"
        elif isinstance(rule, tuple) and _normalised(value) not in rule:
            problems[name] = f"{name}={value!r} (tested values: {', '.join(map(str, rule))})"


def _normalised(value: Any) -> Any:
    return value.lower() if isinstance(value, str) else value


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


# The zero_optimization keys that HF's DeepSpeed templates leave "auto", sized from the model's width
# (transformers' HfTrainerDeepSpeedConfig.trainer_config_finalize applies the same rule). Left to
# DeepSpeed, "auto" means its defaults: a 5e8-element reduce bucket, 2 GB per rank in fp32 whatever
# the model's size.
_WIDTH_KEYS = ("reduce_bucket_size", "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold")


def model_width(model: Any) -> int | None:
    """The hidden size of an HF-style model (``config.hidden_size``, the largest of ``hidden_sizes``,
    or those of ``config.text_config``), or None."""
    return config_width(getattr(model, "config", None))


def config_width(config: Any) -> int | None:
    """model_width from an HF model config (AutoConfig), before the model exists."""
    for source in (config, getattr(config, "text_config", None)):
        if source is None:
            continue
        if isinstance(getattr(source, "hidden_size", None), int):
            return source.hidden_size
        if getattr(source, "hidden_sizes", None):
            return max(source.hidden_sizes)
    return None


def has_width_autos(ds: dict) -> bool:
    """Whether zero_optimization leaves one of the width-sized keys "auto"."""
    zero = ds.get("zero_optimization")
    return isinstance(zero, dict) and any(zero.get(k) == "auto" for k in _WIDTH_KEYS)


def fill_width_autos(ds: dict, width: int | None) -> dict:
    """A copy of ``ds`` whose "auto" bucket sizes follow HF's rule: reduce_bucket_size = width^2; at
    ZeRO 3 stage3_prefetch_bucket_size = 0.9 width^2 and stage3_param_persistence_threshold = 10 width.
    Other "auto" entries of zero_optimization are removed (DeepSpeed's defaults)."""
    zero = ds.get("zero_optimization")
    if not isinstance(zero, dict) or "auto" not in zero.values():
        return ds
    zero = dict(zero)
    stage3 = zero.get("stage") == 3
    wanted = [k for k in _WIDTH_KEYS if zero.get(k) == "auto" and (stage3 or k == "reduce_bucket_size")]
    if wanted and width is None:
        raise ValueError(f"zero_optimization.{wanted[0]}=\"auto\" is sized from the model's hidden size, and this "
                         "model has no config.hidden_size: set " + ", ".join(f"zero_optimization.{k}" for k in wanted)
                         + " to numbers in the DeepSpeed config")
    sizes = {} if width is None else {"reduce_bucket_size": width * width,
                                      "stage3_prefetch_bucket_size": int(0.9 * width * width),
                                      "stage3_param_persistence_threshold": 10 * width}
    for key in [k for k, v in zero.items() if v == "auto"]:
        if key in wanted:
            zero[key] = sizes[key]
        else:
            del zero[key]
    return {**ds, "zero_optimization": zero}
