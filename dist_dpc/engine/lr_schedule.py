"""Learning-rate schedules as a pure function of the logical step.

The engine sets the optimizer's lr from ``lr_factor(step)`` before every step, so a resumed run
needs no scheduler state: the step count restored from the checkpoint is enough. No step gets a
learning rate of 0 (warm-up starts at lr/(W+1), linear decay ends at lr/(T-W)): every DP step
spends privacy, and a step that cannot move the model would spend it for nothing.
"""

from __future__ import annotations

import functools
from typing import Callable

SCHEDULES = ("constant", "linear")


def lr_factor(step: int, *, schedule: str, total_steps: int, warmup_steps: int = 0) -> float:
    """Multiplier of the base learning rate for 0-based logical step ``step`` of ``total_steps``."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if schedule == "constant":
        return 1.0
    if schedule == "linear":  # 1 right after warm-up, down to 1/(T-W) at the last step
        return (total_steps - step) / max(1, total_steps - warmup_steps)
    raise ValueError(f"lr schedule {schedule!r} is unknown; allowed: {', '.join(SCHEDULES)}")


def make_lr_schedule(schedule: str, total_steps: int, warmup_steps: int = 0) -> Callable[[int], float] | None:
    """None for a constant rate without warm-up (the optimizer's lr is left alone)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"train.lr_schedule={schedule!r} is invalid; allowed: {', '.join(SCHEDULES)}")
    if schedule == "constant" and warmup_steps == 0:
        return None
    return functools.partial(lr_factor, schedule=schedule, total_steps=total_steps, warmup_steps=warmup_steps)
