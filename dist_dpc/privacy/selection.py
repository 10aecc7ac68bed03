"""Private hyper-parameter selection (Papernot & Steinke, ICLR 2022, "Hyperparameter tuning with
Renyi differential privacy"), the accounting and the random number of trials.

Run a DP mechanism Q (one trial: a random candidate, a DP training run, a DP score) K times, K drawn
from a truncated negative binomial D_{eta,gamma}, and release only the best trial. Their Theorem 2:
if Q is (lambda, eps)-RDP and (lambda_hat, eps_hat)-RDP, the selection is (lambda, eps')-RDP with

    eps' = eps + (1 + eta) (1 - 1/lambda_hat) eps_hat + (1 + eta) log(1/gamma) / lambda_hat
           + log(E[K]) / (lambda - 1)

for every lambda > 1 and lambda_hat >= 1; here lambda_hat is minimised over the same grid of
orders. E[K] = eta (1 - gamma) / (gamma (1 - gamma^eta)) for eta != 0 and (1/gamma - 1) / log(1/gamma)
for eta = 0 (logarithmic). eta = 1 is the geometric distribution, E[K] = 1/gamma.

The number K is part of the mechanism's secret randomness: publishing it (or the other trials'
outputs) is not covered by this bound. Only the selected trial is released.
"""

from __future__ import annotations

import math

import numpy as np

from dist_dpc.privacy.accounting import rdp_orders


def expected_trials(eta: float, gamma: float) -> float:
    """E[K] for K ~ D_{eta,gamma}, the negative binomial conditioned on K >= 1."""
    _check(eta, gamma)
    if eta == 0:
        return (1 / gamma - 1) / math.log(1 / gamma)
    return eta * (1 - gamma) / (gamma * (1 - gamma ** eta))


def gamma_for_mean(eta: float, mean: float) -> float:
    """The gamma at which D_{eta,gamma} has expectation ``mean`` (> 1): E[K] falls as gamma grows."""
    if not mean > 1:
        raise ValueError(f"tune.expected_trials={mean!r} is invalid: must be > 1 (E[K] of a distribution on 1, 2, ...)")
    lo, hi = 1e-12, 1 - 1e-12
    for _ in range(200):
        mid = math.sqrt(lo * hi) if hi < 0.5 else (lo + hi) / 2
        if expected_trials(eta, mid) > mean:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def sample_trials(eta: float, gamma: float, rng: np.random.Generator) -> int:
    """One draw of K ~ D_{eta,gamma} from ``rng`` (which must be secret randomness)."""
    _check(eta, gamma)
    if eta == 0:
        return int(rng.logseries(1 - gamma))
    while True:  # P[K = k] proportional to C(k + eta - 1, k) (1 - gamma)^k for k >= 1: reject k = 0
        k = int(rng.negative_binomial(eta, gamma))
        if k >= 1:
            return k


def selection_rdp(trial_rdp, eta: float, gamma: float) -> np.ndarray:
    """The RDP curve (at ``rdp_orders()``) of releasing the best of K ~ D_{eta,gamma} trials, each
    with RDP curve ``trial_rdp`` (at the same orders). Theorem 2, lambda_hat minimised on the grid."""
    _check(eta, gamma)
    orders = np.asarray(rdp_orders())
    eps = np.asarray(trial_rdp, dtype=float)
    if eps.shape != orders.shape:
        raise ValueError(f"trial_rdp has {eps.size} values, rdp_orders() {orders.size}")
    log_mean = math.log(expected_trials(eta, gamma))
    # The lambda_hat-dependent part, minimised once over the grid (it does not depend on lambda).
    hat = (1 + eta) * ((1 - 1 / orders) * eps + math.log(1 / gamma) / orders)
    best_hat = float(np.min(hat))
    return eps + best_hat + log_mean / (orders - 1)


def _check(eta: float, gamma: float) -> None:
    # The theorem holds for eta > -1; eta in (-1, 0) would need another sampler than numpy's.
    if not (eta == 0 or eta >= 0.01) or not math.isfinite(eta):
        raise ValueError(f"tune.eta={eta!r} is invalid: must be 0 (logarithmic) or >= 0.01 (1: geometric)")
    if not 0 < gamma < 1:
        raise ValueError(f"gamma={gamma!r} must be in (0, 1)")
