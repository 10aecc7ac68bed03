"""The one-run audit's lower bound (Steinke, Nasr & Jagielski 2023) against values computed by hand
from the paper's formula, and its validity: on a mechanism that is exactly epsilon-DP (randomized
response on each canary's membership) it exceeds epsilon in at most about 5 % of runs at 95 %."""

import math

import numpy as np
import pytest

from dist_dpc.privacy.audit import audit_lower_bound, audit_p_value, epsilon_lower_bound, one_run_guesses


def test_all_guesses_right_without_delta_is_closed_form():
    # p(eps) = q^r when v = r and delta = 0; the bound solves q^10 = 0.05 by hand.
    q = 0.05 ** (1 / 10)
    assert epsilon_lower_bound(1000, 10, 10, 0.0, 0.95) == pytest.approx(math.log(q / (1 - q)), rel=1e-9)
    assert audit_p_value(1000, 10, 10, math.log(3), 0.0) == pytest.approx(0.75 ** 10, rel=1e-12)


def test_delta_term_by_hand():
    # m 5, r 2, v 2, eps ln 3 (q = 3/4): tail P[B >= 2] = 9/16; P[B = 1] / 1 = 3/8, P[B <= 1] / 2 = 7/32:
    # the max is 3/8, so p = 9/16 + 2 * 5 * 0.01 * 3/8 = 0.6.
    assert audit_p_value(5, 2, 2, math.log(3), 0.01) == pytest.approx(0.6, rel=1e-12)
    assert audit_p_value(5, 2, 2, math.log(3), 1.0) == 1.0  # capped


def test_no_evidence_gives_zero_and_more_correct_guesses_give_more():
    assert epsilon_lower_bound(1000, 200, 100, 1e-5) == 0.0
    bounds = [epsilon_lower_bound(1000, 200, v, 1e-5) for v in (130, 150, 170, 190, 200)]
    assert bounds == sorted(bounds) and bounds[0] > 0
    assert epsilon_lower_bound(1000, 200, 170, 1e-5) < epsilon_lower_bound(1000, 200, 170, 0.0)


def test_guesses_take_the_extremes_and_count_correct_ones():
    scores = [0.1, 0.9, 0.5, 0.8, 0.2, 0.3]
    included = [False, True, True, False, False, True]
    # in: 0.9 (right), 0.8 (wrong); out: 0.1 (right), 0.2 (right)
    assert one_run_guesses(scores, included, 2, 2) == (4, 3)
    assert one_run_guesses(scores, included, 0, 1) == (1, 1)
    with pytest.raises(ValueError, match="k_plus"):
        one_run_guesses(scores, included, 4, 3)


def test_does_not_cry_wolf_on_an_exactly_dp_mechanism():
    """Randomized response at eps 1 on each canary's bit is exactly 1-DP; the 95 % bound may exceed
    1 in about 5 % of runs. 200 runs: more than 20 would have probability ~1e-3."""
    rng = np.random.default_rng(0)
    eps, m, trials, over = 1.0, 1000, 200, 0
    p_right = math.exp(eps) / (1 + math.exp(eps))
    for _ in range(trials):
        included = rng.random(m) < 0.5
        report = np.where(rng.random(m) < p_right, included, ~included)  # the mechanism's output
        scores = report + rng.random(m) * 1e-3  # the auditor's score: the released bit
        r, v = one_run_guesses(scores, included, 300, 300)
        over += epsilon_lower_bound(m, r, v, 0.0) > eps
    assert over <= 20, over


def test_choosing_among_guess_counts_costs_confidence():
    """Each pre-registered test runs at alpha / (number of tests); the result is the best of them."""
    rng = np.random.default_rng(1)
    included = rng.random(1000) < 0.5
    scores = included * 3.0 + rng.normal(size=1000)
    out = audit_lower_bound(scores, included, 1e-5, 0.95, (0.02, 0.1, 0.5))
    assert out["per_test_confidence"] == pytest.approx(1 - 0.05 / 3)
    for test, f in zip(out["tests"], (0.02, 0.1, 0.5)):
        k = round(f * 500)
        r, v = one_run_guesses(scores, included, k, k)
        assert (test["guesses"], test["correct"]) == (r, v)
        assert test["epsilon_lb"] == pytest.approx(epsilon_lower_bound(1000, r, v, 1e-5, 1 - 0.05 / 3))
    assert out["epsilon_lb"] == max(t["epsilon_lb"] for t in out["tests"]) > 1
    # one test alone at the full confidence is never below the same test under Bonferroni
    single = audit_lower_bound(scores, included, 1e-5, 0.95, (0.1,))
    assert single["tests"][0]["epsilon_lb"] >= out["tests"][1]["epsilon_lb"]


def test_the_bonferroni_bound_does_not_cry_wolf():
    """Randomized response at eps 1 again, now with the best of six guess counts reported: the
    chance that the reported bound exceeds 1 stays about 5 % or less (100 runs, at most 12: a correct
    5 % test exceeds that with probability below 1 %)."""
    rng = np.random.default_rng(2)
    eps, m, over = 1.0, 1000, 0
    p_right = math.exp(eps) / (1 + math.exp(eps))
    for _ in range(100):
        included = rng.random(m) < 0.5
        report = np.where(rng.random(m) < p_right, included, ~included)
        over += audit_lower_bound(report + rng.random(m) * 1e-3, included, 0.0)["epsilon_lb"] > eps
    assert over <= 12, over


def test_tests_that_cannot_reject_are_dropped_before_any_score_and_the_ceiling():
    from dist_dpc.privacy.audit import audit_ceiling, usable_tests

    # m 1,000, delta 1.09e-4: 2 m delta = 0.218 swamps 20 perfect guesses (p(0) = 0.0158 > 0.05 / 6).
    assert audit_p_value(1000, 20, 20, 0.0, 1.09e-4) > 0.05 / 6
    fractions = usable_tests(1000, 1.09e-4, 0.95, (0.02, 0.05, 0.1, 0.2, 0.5, 1.0))
    assert 0.02 not in fractions and 1.0 in fractions
    per_test = 1 - 0.05 / len(fractions)
    assert all(epsilon_lower_bound(1000, 2 * round(f * 500), 2 * round(f * 500), 1.09e-4, per_test) > 0
               for f in fractions)
    ceiling = audit_ceiling(1000, 1.09e-4, 0.95, (0.02, 0.05, 0.1, 0.2, 0.5, 1.0))
    assert ceiling == pytest.approx(max(epsilon_lower_bound(1000, 2 * round(f * 500), 2 * round(f * 500), 1.09e-4,
                                                            per_test) for f in fractions))
    assert 3 < ceiling < 6  # the most a 1,000-canary audit can show here
    # two statistics: twice the tests, each at half the level, and the ceiling drops a little
    assert audit_ceiling(1000, 1.09e-4, 0.95, (0.1, 0.5, 1.0), 2) < audit_ceiling(1000, 1.09e-4, 0.95, (0.1, 0.5, 1.0))
    out = audit_lower_bound({"a": np.arange(1000.0), "b": -np.arange(1000.0)}, np.arange(1000) >= 500, 1e-5, 0.95,
                            (0.1, 0.5))
    assert len(out["tests"]) == 4 and out["per_test_confidence"] == pytest.approx(1 - 0.05 / 4)
    assert out["best_score"] == "a" and out["epsilon_lb"] > 3  # "a" ranks perfectly, "b" perfectly wrong
