"""The DP histogram of control codes: its noise scale (statistical), allocations that sum to N and
never go negative, and its ledger mechanism's epsilon against the exact Gaussian mechanism."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dist_dpc.privacy.accounting import compute_epsilon
from dist_dpc.privacy.histogram import allocate, gaussian_epsilon, histogram_mechanism, noisy_histogram
from dist_dpc.privacy.randomness import SecretKey


def test_noise_is_gaussian_with_the_stated_scale_on_every_category():
    counts = [0, 3, 10, 0, 250]
    sigma = 4.0
    draws = np.stack([noisy_histogram(counts, sigma, SecretKey.from_seed(s)) for s in range(2000)]) - counts
    # 10,000 standard normals after scaling: mean within 5 standard errors, variance within a
    # chi-square 99.9999 % interval; empty categories get noise like the others.
    z = draws / sigma
    assert abs(z.mean()) < 5 / math.sqrt(z.size)
    from scipy.stats import chi2

    dof = z.size
    lo, hi = chi2.ppf(1e-6, dof) / dof, chi2.ppf(1 - 1e-6, dof) / dof
    assert lo < float((z ** 2).mean()) < hi
    for j in range(len(counts)):
        assert 0.9 < float(z[:, j].std()) < 1.1
    assert not np.array_equal(noisy_histogram(counts, sigma, SecretKey.from_seed(0)),
                              noisy_histogram(counts, sigma, SecretKey.from_seed(1)))
    with pytest.raises(ValueError, match="not DP"):
        noisy_histogram(counts, 0.0, SecretKey.from_seed(0))


def test_allocations_sum_to_the_total_and_are_never_negative():
    assert allocate([10.0, 30.0, 60.0], 10) == [1, 3, 6]
    assert allocate([-5.0, 1.0, 1.0], 5) == [0, 3, 2]          # negative clamped; tie -> lower index
    assert allocate([-1.0, -2.0], 4) == [2, 2]                 # nothing positive: an even split
    assert allocate([1.0, 1.0, 1.0], 0) == [0, 0, 0]
    rng = np.random.default_rng(0)
    for _ in range(500):
        noisy = rng.normal(0, 50, size=rng.integers(1, 12))
        total = int(rng.integers(0, 5000))
        out = allocate(noisy, total)
        assert sum(out) == total and min(out) >= 0
        positive = np.clip(noisy, 0, None)
        if positive.sum() > 0:  # each share within one sample of its exact proportion
            exact = positive / positive.sum() * total
            assert np.all(np.abs(np.array(out) - exact) < 1 + 1e-9)


@pytest.mark.parametrize("sigma", [1.0, 3.0, 10.0])
def test_ledger_mechanism_epsilon_matches_the_exact_gaussian_mechanism(sigma):
    delta = 1e-5
    exact = gaussian_epsilon(sigma, delta)
    ledger = compute_epsilon([histogram_mechanism(sigma)], delta, "prv")
    rdp = compute_epsilon([histogram_mechanism(sigma)], delta, "rdp")
    assert ledger >= exact * (1 - 1e-3)        # never reports less than the truth (PRV's own margin)
    assert ledger <= exact * 1.05 + 0.02       # and is close to it
    assert rdp >= exact                         # RDP is an upper bound
