"""Private selection (Papernot & Steinke 2022): Theorem 2 against a hand computation, the number of
trials against its distribution, and RDP curves in the ledger composed by RDP."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dist_dpc.privacy.accounting import (Mechanism, RdpCurve, compute_epsilon, epsilon_from_rdp, mechanism_from_dict,
                                         rdp_of, rdp_orders)
from dist_dpc.privacy.ledger import PrivacyBudgetExceeded, PrivacyLedger
from dist_dpc.privacy.selection import expected_trials, gamma_for_mean, sample_trials, selection_rdp


def gaussian_curve(sigma: float) -> np.ndarray:
    return np.asarray(rdp_orders()) / (2 * sigma ** 2)


def test_theorem_2_by_hand_at_order_2():
    # Gaussian mechanism, sigma 2: eps(lambda) = lambda / 8. Geometric K (eta = 1), gamma = 0.1:
    # E[K] = 10. At lambda = 2: eps = 0.25; the lambda_hat term 2 ((1 - 1/l) l/8 + ln(10)/l) =
    # 2 ((l - 1)/8 + ln(10)/l) is smallest near l = sqrt(8 ln 10) = 4.29; the grid's 4.3 gives
    # 2 (3.3/8 + 2.302585/4.3) = 1.895970; log(E[K]) / (2 - 1) = 2.302585. Total 4.448555.
    orders = list(rdp_orders())
    out = selection_rdp(gaussian_curve(2.0), eta=1.0, gamma=0.1)
    assert out[orders.index(2.0)] == pytest.approx(0.25 + 2 * (3.3 / 8 + math.log(10) / 4.3) + math.log(10), abs=1e-9)
    assert expected_trials(1.0, 0.1) == pytest.approx(10.0)


def test_theorem_2_general_eta_matches_formula_on_every_order():
    eta, gamma = 0.5, 0.05
    curve = gaussian_curve(3.0)
    orders = np.asarray(rdp_orders())
    mean = eta * (1 - gamma) / (gamma * (1 - gamma ** eta))
    hat = min((1 + eta) * ((1 - 1 / lh) * e + math.log(1 / gamma) / lh) for lh, e in zip(orders, curve))
    expected = [e + hat + math.log(mean) / (lam - 1) for lam, e in zip(orders, curve)]
    assert selection_rdp(curve, eta, gamma) == pytest.approx(expected, rel=1e-12)
    # Logarithmic distribution (eta = 0): E[K] = (1/gamma - 1) / log(1/gamma).
    assert expected_trials(0.0, 0.05) == pytest.approx(19 / math.log(20))


@pytest.mark.parametrize("eta,mean", [(1.0, 4.0), (0.0, 6.0), (2.0, 5.0)])
def test_trial_count_has_the_accounted_distribution(eta, mean):
    gamma = gamma_for_mean(eta, mean)
    assert expected_trials(eta, gamma) == pytest.approx(mean, rel=1e-6)
    rng = np.random.default_rng(1)
    draws = np.array([sample_trials(eta, gamma, rng) for _ in range(20000)])
    assert draws.min() >= 1
    # The sample mean within 5 standard errors of E[K] (a wrong sampler, e.g. one that keeps K = 0 or
    # uses 1 - gamma as the success probability, is many errors off).
    assert abs(draws.mean() - mean) < 5 * draws.std() / math.sqrt(len(draws))
    if eta == 1.0:  # geometric: P[K = 1] = gamma
        assert abs((draws == 1).mean() - gamma) < 5 * math.sqrt(gamma * (1 - gamma) / len(draws))


def test_selection_costs_more_than_one_trial_and_grows_with_trials():
    curve = gaussian_curve(5.0)
    one = epsilon_from_rdp(curve, 1e-5)
    few = epsilon_from_rdp(selection_rdp(curve, 1.0, gamma_for_mean(1.0, 3)), 1e-5)
    many = epsilon_from_rdp(selection_rdp(curve, 1.0, gamma_for_mean(1.0, 30)), 1e-5)
    assert one < few < many


def test_rdp_curves_compose_in_the_ledger_by_rdp(tmp_path):
    sgd = Mechanism(1.1, 0.05, 100, "teacher")
    curve = RdpCurve(tuple(selection_rdp(gaussian_curve(4.0), 1.0, 0.25)), "private selection", "tune")
    ledger = PrivacyLedger(tmp_path / "ledger.json", 50.0, 1e-5, 1000)
    ledger.record("tune", [curve], status="completed")
    ledger.record("teacher", [sgd], status="completed")
    expected = epsilon_from_rdp(rdp_of([sgd]) + np.asarray(curve.rdp), 1e-5)
    assert ledger.total_epsilon() == pytest.approx(expected, rel=1e-12)
    assert ledger.total_epsilon() > compute_epsilon([sgd], 1e-5) + 0.5
    # Written and read back: the same curve, the same total.
    again = PrivacyLedger(tmp_path / "ledger.json", 50.0, 1e-5, 1000)
    assert again.total_epsilon() == pytest.approx(expected, rel=1e-12)
    stored = again.phases()["tune"]["mechanisms"][0]
    assert stored["kind"] == "rdp_curve" and mechanism_from_dict(stored).rdp == curve.rdp
    # A curve recorded at other orders cannot be composed exactly: refused, not guessed.
    with pytest.raises(ValueError, match="other RDP orders"):
        mechanism_from_dict({**stored, "orders": stored["orders"][:-1], "rdp": stored["rdp"][:-1]})
    # A reservation is checked against the target with the curve counted.
    small = PrivacyLedger(tmp_path / "small.json", 3.0, 1e-5, 1000)
    small.record("tune", [curve], status="completed")
    with pytest.raises(PrivacyBudgetExceeded):
        small.reserve("teacher", lambda others, previous: [sgd])
    assert "teacher" not in small.phases()


@pytest.mark.parametrize("eta", [1.0, 0.5])
def test_trial_count_distribution_chi_square(eta):
    from scipy import stats

    gamma = 0.2
    rng = np.random.default_rng(7)
    draws = np.array([sample_trials(eta, gamma, rng) for _ in range(20000)])
    ks = np.arange(1, 11)
    # D_{eta,gamma}: the negative binomial conditioned on K >= 1.
    pmf = stats.nbinom.pmf(ks, eta, gamma) / (1 - gamma ** eta)
    observed = np.array([(draws == k).sum() for k in ks] + [(draws > 10).sum()])
    expected = np.append(pmf, 1 - pmf.sum()) * len(draws)
    chi2 = float(((observed - expected) ** 2 / expected).sum())
    assert chi2 < stats.chi2.ppf(0.999, df=len(observed) - 1), chi2


def test_accountant_state_with_a_curve_prior_round_trips():
    """A phase that resumes from a checkpoint in a tree that ran `dpc tune` reloads a prior with an
    RDP curve (its accountant state), and its epsilon composes it."""
    from dist_dpc.privacy.accounting import PrivacyAccountant

    curve = RdpCurve(tuple(selection_rdp(gaussian_curve(4.0), 1.0, 0.25)), "private selection", "tune")
    acc = PrivacyAccountant("prv", 1e-5, prior=(curve,))
    acc.step(1.0, 0.01, 50)
    again = PrivacyAccountant("prv", 1e-5)
    again.load_state_dict(acc.state_dict())
    assert again.epsilon() == pytest.approx(acc.epsilon())
    assert again.epsilon() > epsilon_from_rdp(np.asarray(curve.rdp), 1e-5)
