"""A DP histogram of public categories (e.g. the control codes of a private text set) and its
post-processing into an allocation of N samples.

Adding or removing one record changes one count by 1: L2 sensitivity 1. The Gaussian mechanism adds
N(0, sigma^2) to every category's count -- every category of the public schema, present in the data
or not, so that which categories occur is not revealed by which ones get noise. In the ledger it is
Mechanism(sigma, sample_rate=1, steps=1): the Gaussian mechanism without subsampling. Clamping the
noisy counts at 0 and rounding them into an allocation is post-processing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from dist_dpc.privacy.accounting import Mechanism
from dist_dpc.privacy.randomness import SecretKey


def histogram_mechanism(noise_multiplier: float, phase: str = "histogram") -> Mechanism:
    """What one release of a noisy histogram costs (sensitivity 1, no subsampling)."""
    if not noise_multiplier > 0:
        raise ValueError(f"noise_multiplier={noise_multiplier!r}: a histogram released without noise is not DP; "
                         "give a noise multiplier > 0")
    return Mechanism(noise_multiplier, 1.0, 1, phase=phase)


def noisy_histogram(counts: Sequence[int], noise_multiplier: float, key: SecretKey) -> np.ndarray:
    """counts + N(0, sigma^2) per category (float64), drawn from the key alone."""
    histogram_mechanism(noise_multiplier)  # refuses sigma <= 0
    exact = np.asarray(counts, dtype=np.float64)
    return exact + key.generator("dp-histogram").standard_normal(exact.shape) * noise_multiplier


def allocate(noisy: Sequence[float], total: int) -> list[int]:
    """``total`` samples split in proportion to the noisy counts clamped at 0 (largest remainders get
    the rounding; ties to the lower index): non-negative integers summing to ``total``. All counts
    <= 0: an even split."""
    if total < 0:
        raise ValueError(f"total={total!r} must be >= 0")
    weights = np.clip(np.asarray(noisy, dtype=np.float64), 0.0, None)
    k = len(weights)
    if k == 0:
        raise ValueError("allocate: no categories")
    if not np.isfinite(weights).all():
        raise ValueError("allocate: noisy counts must be finite")
    if weights.sum() <= 0:
        weights = np.ones(k)
    shares = weights / weights.sum() * total
    base = np.floor(shares).astype(np.int64)
    remainder = total - int(base.sum())
    order = sorted(range(k), key=lambda i: (-(shares[i] - base[i]), i))
    for i in order[:remainder]:
        base[i] += 1
    return [int(x) for x in base]


def gaussian_epsilon(noise_multiplier: float, delta: float) -> float:
    """The exact epsilon of one Gaussian mechanism of sensitivity 1 (Balle & Wang 2018, Theorem 8),
    by bisection on delta(eps) = Phi(1/(2s) - eps s) - e^eps Phi(-1/(2s) - eps s). A reference for
    the accountants (they must not report less)."""
    from scipy.stats import norm

    s = noise_multiplier

    def delta_of(eps: float) -> float:
        return norm.cdf(1 / (2 * s) - eps * s) - math.exp(eps) * norm.cdf(-1 / (2 * s) - eps * s)

    lo, hi = 0.0, 1.0
    while delta_of(hi) > delta:
        hi *= 2
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if delta_of(mid) > delta else (lo, mid)
    return hi
