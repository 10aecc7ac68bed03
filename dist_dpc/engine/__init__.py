"""The DP step under DeepSpeed: config checks, distributed set-up, the engine (no transformers here)."""

from dist_dpc.engine.distributed import WorldInfo, init_distributed, world_from_env
from dist_dpc.engine.dp_engine import DPEngine, PrivacyBudgetError, StepStats, resolve_noise
from dist_dpc.engine.ds_config import UnsafeDeepSpeedConfig, build_ds_config, check_dp_safe

__all__ = ["DPEngine", "PrivacyBudgetError", "StepStats", "UnsafeDeepSpeedConfig", "WorldInfo", "build_ds_config",
           "check_dp_safe", "init_distributed", "resolve_noise", "world_from_env"]
