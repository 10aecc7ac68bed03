"""What the user asks of the privacy mechanism. Checked here, enforced by the engine."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(kw_only=True)
class PrivacyConfig:
    enabled: bool = True
    """Train with DP-SGD. false trains without any privacy guarantee and says so loudly."""
    target_epsilon: float | None = 8.0
    """Epsilon to reach at the end of training; sigma is calibrated for it. null: give noise_multiplier."""
    noise_multiplier: float | None = None
    """Sigma of the Gaussian noise, in units of max_grad_norm. Set it instead of target_epsilon, or
    with it (then the run refuses to start if the planned steps exceed target_epsilon)."""
    delta: float | None = None
    """Delta of (epsilon, delta)-DP. null: 1/N^1.1 for N training examples. Must be < 1/N."""
    max_grad_norm: float = 1.0
    """Per-sample clipping threshold C (the L2 sensitivity of the summed gradient)."""
    clipping: Literal["flat", "per_layer"] = "per_layer"
    """flat: one norm over all parameters (papers' semantics, two forward passes).
    per_layer: thresholds C_l = C/sqrt(L) for each of the L layers, one forward and one backward."""
    sampling: Literal["poisson", "shuffle"] = "poisson"
    """poisson: each example joins a logical batch independently with probability q (what the
    accountant assumes). shuffle: fixed-size batches; the report then says the accounting assumes Poisson."""
    accountant: Literal["prv", "rdp"] = "prv"
    """Accountant for epsilon (the other one is logged beside it)."""
    noise_seed: int | None = None
    """Seed of the noise and sampling generators. null: drawn from the OS and saved with the run."""

    def __post_init__(self) -> None:
        if self.max_grad_norm <= 0:
            raise ValueError(f"privacy.max_grad_norm={self.max_grad_norm!r} is invalid: must be > 0")
        if self.target_epsilon is not None and self.target_epsilon <= 0:
            raise ValueError(f"privacy.target_epsilon={self.target_epsilon!r} is invalid: must be > 0 (or null with privacy.noise_multiplier set)")
        if self.noise_multiplier is not None and self.noise_multiplier < 0:
            raise ValueError(f"privacy.noise_multiplier={self.noise_multiplier!r} is invalid: must be >= 0")
        if self.delta is not None and not 0 < self.delta < 1:
            raise ValueError(f"privacy.delta={self.delta!r} is invalid: must be in (0, 1) and below 1/N")
        if self.enabled and self.target_epsilon is None and self.noise_multiplier is None:
            raise ValueError("privacy: set privacy.target_epsilon (sigma is then calibrated) or privacy.noise_multiplier")
