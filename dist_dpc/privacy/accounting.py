"""Privacy accounting over opacus' accountants: composition, calibration, a live per-phase accountant.

Every epsilon here is the composition of a list of subsampled-Gaussian mechanisms (sigma, q, steps)
by opacus' PRV (default) or RDP accountant — heterogeneous composition, never a sum of epsilons.
"""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import asdict, dataclass
from typing import Sequence

ACCOUNTANTS = ("prv", "rdp")
MAX_SIGMA = 1000.0
# Beyond this RDP epsilon, PRV's discretisation takes minutes and the number is meaningless anyway:
# the RDP value (an upper bound, so still a valid guarantee) is reported instead, with a warning.
PRV_EPSILON_CUTOFF = 100.0


@dataclass(frozen=True)
class Mechanism:
    """One Poisson-subsampled Gaussian mechanism applied ``steps`` times."""

    noise_multiplier: float
    sample_rate: float
    steps: int
    phase: str = ""

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Mechanism":
        return cls(float(d["noise_multiplier"]), float(d["sample_rate"]), int(d["steps"]), str(d.get("phase", "")))


def _check(accountant: str, delta: float) -> None:
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"privacy.accountant={accountant!r} is invalid: allowed values are {', '.join(ACCOUNTANTS)}")
    if not 0 < delta < 1:
        raise ValueError(f"delta={delta!r} must be in (0, 1)")


@functools.lru_cache(maxsize=4096)
def _epsilon(history: tuple[tuple[float, float, int], ...], delta: float, accountant: str) -> float:
    from opacus.accountants import PRVAccountant, RDPAccountant

    acc = PRVAccountant() if accountant == "prv" else RDPAccountant()
    acc.history = [tuple(h) for h in history]
    if accountant == "prv":
        # eps_error bounds the discretisation error of the upper bound that opacus returns.
        return float(acc.get_epsilon(delta=delta, eps_error=0.01))
    return float(acc.get_epsilon(delta=delta))


def compute_epsilon(mechanisms: Sequence[Mechanism], delta: float, accountant: str = "prv") -> float:
    _check(accountant, delta)
    history = []
    for m in mechanisms:
        if m.steps <= 0:
            continue
        if not 0 < m.sample_rate <= 1:
            raise ValueError(f"sample rate {m.sample_rate} must be in (0, 1]")
        if m.noise_multiplier <= 0:
            return math.inf
        history.append((float(m.noise_multiplier), float(m.sample_rate), int(m.steps)))
    if not history:
        return 0.0
    # Merge identical consecutive entries so the cache hits and PRV's domain stays tight.
    merged: list[list] = []
    for sigma, q, steps in history:
        if merged and merged[-1][0] == sigma and merged[-1][1] == q:
            merged[-1][2] += steps
        else:
            merged.append([sigma, q, steps])
    key = tuple(tuple(h) for h in merged)
    if accountant == "prv":
        upper = _epsilon(key, float(delta), "rdp")
        if upper > PRV_EPSILON_CUTOFF:
            warnings.warn(f"epsilon > {PRV_EPSILON_CUTOFF:g}: reporting the RDP upper bound {upper:.1f} instead of PRV")
            return upper
    return _epsilon(key, float(delta), accountant)


def calibrate_noise_multiplier(target_epsilon: float, delta: float, sample_rate: float, steps: int,
                               accountant: str = "prv", prior: Sequence[Mechanism] = (),
                               epsilon_tolerance: float = 0.005) -> float:
    """Smallest sigma with epsilon(prior + (sigma, q, steps)) <= target, within ``epsilon_tolerance`` (relative)."""
    _check(accountant, delta)
    if target_epsilon is None or target_epsilon <= 0:
        raise ValueError(f"privacy.target_epsilon={target_epsilon!r} must be > 0")
    prior = tuple(prior)

    def eps(sigma: float) -> float:
        return compute_epsilon(prior + (Mechanism(sigma, sample_rate, steps),), delta, accountant)

    prior_eps = compute_epsilon(prior, delta, accountant)
    if prior_eps >= target_epsilon:
        raise ValueError(f"privacy.target_epsilon={target_epsilon} is unreachable: the earlier phases already spent "
                         f"epsilon={prior_eps:.3f}; raise the target or give this phase a share of a larger budget")
    # Bracket with RDP, which is fast and an upper bound on PRV's epsilon: sigma_rdp is feasible for
    # both. PRV is slow (minutes) far from the target, so it is only evaluated near the answer.
    rdp_eps = (lambda sigma: compute_epsilon(prior + (Mechanism(sigma, sample_rate, steps),), delta, "rdp"))
    high = 0.25
    while rdp_eps(high) > target_epsilon and high <= MAX_SIGMA:
        high *= 2
    if high > MAX_SIGMA and eps(MAX_SIGMA) > target_epsilon:
        raise ValueError(
            f"privacy.target_epsilon={target_epsilon} is unreachable with q={sample_rate:.4g}, {steps} steps, "
            f"delta={delta:.3g}: it would need sigma > {MAX_SIGMA:g}. Train fewer steps/epochs, lower "
            "train.batch_size, raise privacy.target_epsilon or privacy.delta")
    high = min(high, MAX_SIGMA)
    low = high / 2 if accountant == "rdp" else high * 0.6
    while low > 0.05 and eps(low) <= target_epsilon:
        high, low = low, low * 0.6
    # Bisection: epsilon(high) <= target < epsilon(low).
    for _ in range(60):
        if eps(high) >= target_epsilon * (1 - epsilon_tolerance):
            break
        mid = (low + high) / 2
        if eps(mid) > target_epsilon:
            low = mid
        else:
            high = mid
    return high


def max_steps_within_budget(noise_multiplier: float, sample_rate: float, target_epsilon: float, delta: float,
                            accountant: str = "prv", prior: Sequence[Mechanism] = ()) -> int:
    prior = tuple(prior)

    def ok(steps: int) -> bool:
        return compute_epsilon(prior + (Mechanism(noise_multiplier, sample_rate, steps),), delta, accountant) <= target_epsilon

    if not ok(1):
        return 0
    high = 1
    while ok(high * 2):
        high *= 2
        if high > 10**8:
            return high
    low, high = high, high * 2  # ok(low), not ok(high)
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if ok(mid) else (low, mid)
    return low


class PrivacyAccountant:
    """Live accountant for one training phase: steps are recorded as they happen."""

    def __init__(self, accountant: str = "prv", delta: float = 1e-5, prior: Sequence[Mechanism] = (), phase: str = ""):
        _check(accountant, delta)
        self.accountant, self.delta, self.phase = accountant, float(delta), phase
        self.prior = tuple(prior)
        self._history: list[Mechanism] = []

    def step(self, noise_multiplier: float, sample_rate: float, num_steps: int = 1) -> None:
        last = self._history[-1] if self._history else None
        if last is not None and last.noise_multiplier == noise_multiplier and last.sample_rate == sample_rate:
            self._history[-1] = Mechanism(noise_multiplier, sample_rate, last.steps + num_steps, self.phase)
        else:
            self._history.append(Mechanism(noise_multiplier, sample_rate, num_steps, self.phase))

    @property
    def history(self) -> list[Mechanism]:
        return list(self._history)

    @property
    def steps(self) -> int:
        return sum(m.steps for m in self._history)

    def epsilon(self, delta: float | None = None, accountant: str | None = None) -> float:
        return compute_epsilon(self.prior + tuple(self._history), self.delta if delta is None else delta,
                               accountant or self.accountant)

    def state_dict(self) -> dict:
        return {"accountant": self.accountant, "delta": self.delta, "phase": self.phase,
                "prior": [m.to_dict() for m in self.prior], "history": [m.to_dict() for m in self._history]}

    def load_state_dict(self, state: dict) -> None:
        self.accountant, self.delta, self.phase = state["accountant"], float(state["delta"]), state["phase"]
        self.prior = tuple(Mechanism.from_dict(d) for d in state["prior"])
        self._history = [Mechanism.from_dict(d) for d in state["history"]]


def delta_default(dataset_size: int) -> float:
    """1 / N^1.1: strictly below 1/N (a delta of 1/N allows releasing one whole record), and the
    gap grows with N."""
    return 1.0 / dataset_size ** 1.1


def check_delta(delta: float, dataset_size: int) -> None:
    if delta >= 1.0 / dataset_size:
        raise ValueError(
            f"privacy.delta={delta:.3g} must be < 1/N = {1 / dataset_size:.3g} for N={dataset_size} training "
            "examples (a delta of 1/N permits leaking a whole record); leave privacy.delta unset for the "
            f"default 1/N^1.1 = {delta_default(dataset_size):.3g}")
