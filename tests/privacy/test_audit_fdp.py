"""The f-DP one-run audit (Mahloujifar, Melis & Chaudhuri, ICML 2025): the privacy profile it reads
against a closed form, the trade-off bound against the Gaussian trade-off function, the recursion
against a hand computation, and the test's validity and power on simulated mechanisms whose privacy
is known exactly (a correct claim is rejected in at most about 1 - confidence of the runs)."""

import math

import numpy as np
import pytest
from scipy.stats import norm

from dist_dpc.privacy.accounting import Mechanism, compute_epsilon, privacy_profile
from dist_dpc.privacy.audit import (ScaledMechanisms, audit_lower_bound, epsilon_lower_bound, fdp_epsilon_lower_bound,
                                    fdp_rejects, least_other_mass, one_run_guesses)


def gaussian_profile(mu, eps):
    """delta(eps) of mu-GDP (Dong, Roth & Su, Cor. 2.13)."""
    return norm.cdf(-eps / mu + mu / 2) - np.exp(eps) * norm.cdf(-eps / mu - mu / 2)


def gaussian_claim(mu):
    eps = np.linspace(0, 25, 5000)
    return least_other_mass(eps, np.maximum(gaussian_profile(mu, eps), 0))


def test_profile_of_one_gaussian_mechanism_is_the_closed_form_within_opacus_error():
    # q = 1, one step, sigma 2: the Gaussian mechanism, mu = 1/2. Its PRV profile is an upper bound
    # (opacus' eps_error shift plus delta_error): never below the exact curve, and close to it. This
    # also fails loudly if opacus moves the private _get_dprv that privacy_profile reads.
    eps = np.array([0.0, 0.25, 0.5, 1.0, 2.0, 3.0])
    exact = gaussian_profile(0.5, eps)
    got = privacy_profile([Mechanism(2.0, 1.0, 1)], eps)
    assert np.all(got >= exact - 1e-12)
    assert np.all(got <= gaussian_profile(0.5, eps - 0.02) + 2e-9)


def test_profile_agrees_with_the_ledgers_epsilon():
    mechanisms = [Mechanism(1.0, 0.1, 200), Mechanism(2.0, 0.05, 50)]
    for delta in (1e-3, 1e-5):
        eps = compute_epsilon(mechanisms, delta)
        at_eps, below = privacy_profile(mechanisms, [eps, eps - 0.1])
        assert at_eps <= delta * 1.001  # the ledger's epsilon is where the profile reaches delta ...
        assert below > delta            # ... and not much before
    assert privacy_profile([Mechanism(0.0, 0.1, 5)], [1.0])[0] == 1.0  # no noise: no guarantee
    assert privacy_profile([], [1.0])[0] == 0.0


def test_least_other_mass_of_the_gaussian_profile_is_the_gaussian_tradeoff():
    # The least mass under one dataset of an event of mass x under the other, for mu-GDP:
    # Phi(Phi^-1(x) - mu) (the trade-off function G_mu evaluated at 1 - x).
    x = np.array([1e-3, 0.01, 0.1, 0.5, 0.9])
    for mu in (0.5, 1.0, 2.0):
        assert gaussian_claim(mu)(x) == pytest.approx(norm.cdf(norm.ppf(x) - mu), abs=2e-5)


def test_recursion_by_hand_for_pure_dp():
    # eps = ln 2, delta = 0: h(x) = max(x / 2, 1 - 2 (1 - x), 0). m 10, k 4, all 4 right.
    h = least_other_mass([math.log(2)], [0.0])
    # alpha 0.1: right 0.04, wrong 0 -> (i=3) wrong 0.02, right 0.04 + 3 * 0.02 = 0.10
    # -> (i=2) wrong 0.05, right 0.10 + 1 * 0.03 = 0.13 -> (i=1) wrong 0.065, right 0.13 + 0.015 / 3 = 0.135
    # -> (i=0) wrong 0.0675, right 0.135: total 0.2025 <= k/m = 0.4: not rejected.
    assert not fdp_rejects(10, 4, 4, 0.1, h)
    # alpha 0.5: right 0.2 -> wrong 0.1, right 0.5 -> wrong 0.25, right 0.65 -> wrong 0.325, right 0.675
    # -> wrong 0.3375: total 1.0125 > 0.4: rejected.
    assert fdp_rejects(10, 4, 4, 0.5, h)
    # Half the guesses right is what no leak gives: never a rejection.
    assert not fdp_rejects(1000, 200, 100, 0.05, h)


def _gdp_audit(mu_true, rng, m=1000, k=100):
    included = rng.random(m) < 0.5
    scores = rng.normal(mu_true * included, 1.0)  # each canary's score is exactly mu-GDP in its inclusion
    return one_run_guesses(scores, included, k, 0)


def test_a_true_gaussian_claim_is_rarely_rejected_and_a_false_one_often():
    rng = np.random.default_rng(0)
    trials = 300
    for mu in (1.0, 2.0, 3.0):
        h = gaussian_claim(mu)
        rejected = sum(fdp_rejects(1000, *_gdp_audit(mu, rng), 0.05, h) for _ in range(trials))
        assert rejected / trials <= 0.05 + 3 * math.sqrt(0.05 * 0.95 / trials)
    h = gaussian_claim(1.0)  # the run leaks like mu 2, the claim says mu 1
    rejected = sum(fdp_rejects(1000, *_gdp_audit(2.0, rng), 0.05, h) for _ in range(trials))
    assert rejected / trials > 0.5


def _dpsgd_audit(sigma_true, q, steps, rng, m=1000, k=100):
    """Each canary's score: the sum over steps of its coordinate of the released (noisy) gradient sum,
    clipped contribution 1 when included and sampled: exactly the Poisson-subsampled Gaussian mechanism
    the ledger accounts, per canary."""
    included = rng.random(m) < 0.5
    sampled = rng.random((steps, m)) < q
    scores = (sampled & included).sum(axis=0) + rng.normal(0, sigma_true * math.sqrt(steps), m)
    return one_run_guesses(scores, included, k, 0)


def test_dp_sgd_audited_against_its_own_curve():
    rng = np.random.default_rng(1)
    family = ScaledMechanisms([Mechanism(2.0, 0.5, 10)], delta=1e-5)  # epsilon ~4
    claim = family.least_other(1.0)
    trials = 200
    rejected = sum(fdp_rejects(1000, *_dpsgd_audit(2.0, 0.5, 10, rng), 0.05, claim) for _ in range(trials))
    assert rejected / trials <= 0.05 + 3 * math.sqrt(0.05 * 0.95 / trials)
    # A tenth of the noise while the claim keeps sigma 2: caught nearly every time.
    rejected = sum(fdp_rejects(1000, *_dpsgd_audit(0.2, 0.5, 10, rng), 0.05, claim) for _ in range(20))
    assert rejected >= 18


def test_bound_is_monotone_tighter_than_the_epsilon_delta_test_and_zero_without_evidence():
    family = ScaledMechanisms([Mechanism(1.0, 0.1, 200)], delta=1e-5)
    assert fdp_epsilon_lower_bound(1000, 200, 100, family) == 0.0
    bounds = [fdp_epsilon_lower_bound(1000, 200, c, family) for c in (150, 170, 190, 200)]
    assert bounds == sorted(bounds) and bounds[0] > 0
    # The same evidence (200 guesses, all right) read against the whole curve proves more than against
    # one (epsilon, delta) pair (the paper's point), and the bound is a member of the family: rejected.
    assert bounds[-1] > epsilon_lower_bound(1000, 200, 200, 1e-5) + 1
    assert bounds[-1] < ScaledMechanisms.EPSILON_GRID[-1]  # finite, inside the family


def test_audit_lower_bound_f_dp_needs_the_mechanisms_and_reports_its_tests():
    rng = np.random.default_rng(2)
    included = rng.random(1000) < 0.5
    scores = rng.normal(3.0 * included, 1.0)
    with pytest.raises(ValueError, match="mechanisms"):
        audit_lower_bound(scores, included, 1e-5, test="f_dp")
    with pytest.raises(ValueError, match="audit.test"):
        audit_lower_bound(scores, included, 1e-5, test="fdp")
    out = audit_lower_bound(scores, included, 1e-5, 0.95, (0.05, 0.1, 0.2), test="f_dp",
                            mechanisms=[Mechanism(1.0, 0.1, 200)])
    assert out["test"] == "f_dp" and len(out["tests"]) == 3
    assert out["per_test_confidence"] == pytest.approx(1 - 0.05 / 3)
    assert 0 < out["epsilon_lb"] == max(t["epsilon_lb"] for t in out["tests"]) <= out["ceiling"]
    for t in out["tests"]:  # one-sided: f m guesses, all "in"
        assert t["guesses"] == round(t["fraction"] * 1000)
