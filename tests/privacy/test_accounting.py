"""Accounting against opacus' own accountants driven step by step; calibration; step budgets; the live accountant.

Tolerance for "equals opacus": 1e-3 relative. RDP is the same arithmetic as opacus' RDPAccountant
(bit-identical). Our PRV accountant is opacus' PRVAccountant with the discretisation grid widened
to an FFT-friendly length, which moves epsilon by ~1e-7 relative. 1e-3 is still ten times smaller
than the error opacus' PRV bound itself carries (eps_error = 0.01 absolute, 0.3-1 % of the epsilons
here), so grouping the history differently, a different eps_error/delta_error, or a sum of
per-mechanism epsilons would all fail it.
"""

from __future__ import annotations

import json
import math
import re
import time
import warnings

import pytest
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.utils import get_noise_multiplier

from dist_dpc.privacy.accounting import (ACCOUNTANTS, AccountingWarning, Mechanism, PrivacyAccountant,
                                         calibrate_noise_multiplier, check_delta, compute_epsilon, delta_default,
                                         max_steps_within_budget)

pytestmark = pytest.mark.filterwarnings("ignore:Optimal order is the:UserWarning")  # opacus RDP, references

DELTA = 1e-5
Q = 256 / 67349  # batch 256 of SST-2's 67,349 training sentences
TEACHER, STUDENT = Mechanism(1.1, 0.01, 300, "teacher"), Mechanism(0.8, 0.004, 500, "student")
# teacher, student, teacher again: three history entries (consecutive-only merging, as opacus does)
HETEROGENEOUS = [TEACHER, STUDENT, Mechanism(1.1, 0.01, 200, "teacher")]


def opacus_stepwise(mechanisms, accountant, delta=DELTA):
    """Reference: a stock opacus accountant, ``step()`` called once per training step."""
    acc = PRVAccountant() if accountant == "prv" else RDPAccountant()
    for m in mechanisms:
        for _ in range(m.steps):
            acc.step(noise_multiplier=m.noise_multiplier, sample_rate=m.sample_rate)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # RDP "optimal order is the largest alpha"
        return acc.get_epsilon(delta=delta)


@pytest.mark.parametrize("accountant", ACCOUNTANTS)
@pytest.mark.parametrize("mechanisms", [[Mechanism(0.7, Q, 1300)], HETEROGENEOUS], ids=["homogeneous", "heterogeneous"])
def test_epsilon_equals_opacus_stepwise(accountant, mechanisms):
    ours = compute_epsilon(mechanisms, DELTA, accountant)
    reference = opacus_stepwise(mechanisms, accountant)
    assert ours == pytest.approx(reference, rel=1e-3)
    if accountant == "rdp":
        assert ours == reference  # same arithmetic


def test_composition_is_not_a_sum_and_edge_cases():
    parts = [compute_epsilon([m], DELTA) for m in HETEROGENEOUS]
    total = compute_epsilon(HETEROGENEOUS, DELTA)
    assert max(parts) < total < sum(parts)
    assert compute_epsilon([], DELTA) == 0.0
    assert compute_epsilon([Mechanism(0.0, Q, 0), Mechanism(1.0, Q, 0)], DELTA) == 0.0  # steps == 0 ignored
    assert compute_epsilon([TEACHER, Mechanism(0.5, Q, 0)], DELTA) == compute_epsilon([TEACHER], DELTA)
    assert compute_epsilon([TEACHER, Mechanism(0.0, Q, 1)], DELTA) == math.inf  # no noise, no privacy
    # consecutive identical mechanisms are one mechanism
    split = [Mechanism(1.1, 0.01, 200), Mechanism(1.1, 0.01, 100)]
    assert compute_epsilon(split, DELTA) == compute_epsilon([TEACHER], DELTA)


def test_input_validation():
    with pytest.raises(ValueError, match="prv, rdp"):
        compute_epsilon([TEACHER], DELTA, accountant="gdp")
    for bad_delta in (0.0, 1.0, -1e-5, 2.0):
        with pytest.raises(ValueError, match=r"delta.*\(0, 1\)"):
            compute_epsilon([TEACHER], bad_delta)
    for bad_q in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=r"sample_rate.*\(0, 1\]"):
            Mechanism(1.0, bad_q, 10)
        with pytest.raises(ValueError, match=r"sample_rate.*\(0, 1\]"):
            calibrate_noise_multiplier(1.0, DELTA, bad_q, 10)
    with pytest.raises(ValueError, match="steps"):
        Mechanism(1.0, Q, -1)
    with pytest.raises(ValueError, match="noise_multiplier"):
        Mechanism(-1.0, Q, 1)
    assert compute_epsilon([Mechanism(2.0, 1.0, 3)], DELTA) > 0  # q = 1 (full batch) is allowed


@pytest.mark.parametrize("accountant", ACCOUNTANTS)
@pytest.mark.parametrize("target", [1.0, 3.0, 8.0])
def test_calibration_hits_target(accountant, target):
    q, steps = 0.01, 300  # (opacus' bisection is 2-3x slower at the typical q = 256/67349, 1300 steps)
    sigma = calibrate_noise_multiplier(target, DELTA, q, steps, accountant)
    assert target * 0.99 <= compute_epsilon([Mechanism(sigma, q, steps)], DELTA, accountant) <= target
    # the guarantee, checked by a stock opacus accountant
    stock = opacus_stepwise([Mechanism(sigma, q, steps)], accountant)
    assert target * 0.99 <= stock <= target * (1 + 1e-6)
    reference = get_noise_multiplier(target_epsilon=target, target_delta=DELTA, sample_rate=q, steps=steps,
                                     accountant=accountant, epsilon_tolerance=0.01 * target)
    # opacus' bisection stops anywhere in [0.99 target, target]: sigma within a few %
    assert sigma == pytest.approx(reference, rel=0.03)


@pytest.mark.parametrize("target", [1.0, 8.0])
def test_calibration_is_fast_for_typical_settings(target):
    """q = 256/67349, 1300 steps, delta = 1e-5: a few accountant calls, not a bisection of dozens."""
    start = time.perf_counter()
    sigma = calibrate_noise_multiplier(target, DELTA, Q, 1300)
    elapsed = time.perf_counter() - start
    assert target * 0.99 <= compute_epsilon([Mechanism(sigma, Q, 1300)], DELTA) <= target
    assert elapsed < 10  # 0.3-1.2 s on 2 cores; generous for loaded CI machines


def test_calibration_with_prior():
    prior = (Mechanism(1.0, 0.01, 500, "teacher"),)
    spent = compute_epsilon(prior, DELTA)
    sigma = calibrate_noise_multiplier(spent + 1.0, DELTA, 0.01, 500, prior=prior)
    total = compute_epsilon(prior + (Mechanism(sigma, 0.01, 500),), DELTA)
    assert (spent + 1.0) * 0.99 <= total <= spent + 1.0
    # composition, not addition: adding epsilons would demand the noise that gives this phase
    # epsilon 1.0 on its own; composed, the same cumulative target needs less
    assert sigma < calibrate_noise_multiplier(1.0, DELTA, 0.01, 500)


def test_unreachable_targets_say_what_to_change():
    prior = (Mechanism(1.0, 0.01, 500),)
    spent = compute_epsilon(prior, DELTA)
    with pytest.raises(ValueError, match="already spent") as err:
        calibrate_noise_multiplier(spent * 0.9, DELTA, 0.01, 500, prior=prior)
    assert "larger target_epsilon" in str(err.value)
    for accountant in ACCOUNTANTS:
        with pytest.raises(ValueError, match="unreachable") as err:
            calibrate_noise_multiplier(1e-3, DELTA, 0.05, 5000, accountant=accountant)
        for fix in ("fewer steps", "lower sample rate", "larger target_epsilon", "larger delta"):
            assert fix in str(err.value)
        # It says the smallest epsilon these settings allow (the epsilon at the largest noise).
        floor = compute_epsilon((Mechanism(1000.0, 0.05, 5000),), DELTA, accountant=accountant)
        stated = float(re.search(r"allow is about ([0-9.e+-]+)", str(err.value)).group(1))
        assert stated == pytest.approx(floor, rel=1e-3)
    with pytest.raises(ValueError, match="target_epsilon"):
        calibrate_noise_multiplier(0.0, DELTA, Q, 100)


def test_delta_rule():
    n = 67349
    assert delta_default(n) == pytest.approx(n ** -1.1) and delta_default(n) < 1 / n
    check_delta(delta_default(n), n)
    check_delta(1e-5, n)
    for bad in (1 / n, 2 / n, 0.5):
        with pytest.raises(ValueError, match=r"privacy\.delta=.* must be < 1/N = .* for N=67349 training") as err:
            check_delta(bad, n)
        assert "1/(N ln N)" in str(err.value) and "leave it unset" in str(err.value)


@pytest.mark.parametrize("accountant", ACCOUNTANTS)
def test_max_steps_is_tight(accountant):
    sigma, q, target = 1.0, 0.01, 1.5
    steps = max_steps_within_budget(sigma, q, target, DELTA, accountant=accountant)
    assert steps > 100
    assert compute_epsilon([Mechanism(sigma, q, steps)], DELTA, accountant) <= target
    assert compute_epsilon([Mechanism(sigma, q, steps + 1)], DELTA, accountant) > target
    # with a prior, fewer steps remain (still tight); none when the prior alone is over budget
    prior = [Mechanism(2.0, 0.02, 100)]
    after = max_steps_within_budget(sigma, q, target, DELTA, accountant, prior=prior)
    assert 0 < after < steps
    assert compute_epsilon(prior + [Mechanism(sigma, q, after)], DELTA, accountant) <= target
    assert compute_epsilon(prior + [Mechanism(sigma, q, after + 1)], DELTA, accountant) > target
    assert max_steps_within_budget(sigma, q, 0.5 * compute_epsilon(prior, DELTA, accountant), DELTA, accountant,
                                   prior=prior) == 0
    assert max_steps_within_budget(0.0, q, target, DELTA, accountant) == 0


def test_live_accountant_merges_composes_and_round_trips():
    acc = PrivacyAccountant(delta=DELTA, prior=[TEACHER], phase="student")
    for _ in range(10):
        acc.step(0.9, 0.02)
    acc.step(1.2, 0.02)
    acc.step(1.2, 0.02, num_steps=4)
    acc.step(0.9, 0.02)
    assert [(m.noise_multiplier, m.steps, m.phase) for m in acc.history] == [
        (0.9, 10, "student"), (1.2, 5, "student"), (0.9, 1, "student")]
    assert acc.steps == 16
    # prior + history, heterogeneous composition; the RDP bound beside it
    assert acc.epsilon() == compute_epsilon([TEACHER] + acc.history, DELTA)
    assert acc.epsilon(accountant="rdp") == compute_epsilon([TEACHER] + acc.history, DELTA, "rdp")
    prior_only = PrivacyAccountant(delta=DELTA, prior=[TEACHER])
    assert acc.epsilon() > prior_only.epsilon() == compute_epsilon([TEACHER], DELTA)
    assert acc.epsilon(delta=1e-7) > acc.epsilon()
    again = PrivacyAccountant(accountant="rdp", delta=1e-3)
    again.load_state_dict(json.loads(json.dumps(acc.state_dict())))
    assert again.history == acc.history and again.prior == acc.prior
    assert again.epsilon() == acc.epsilon()
    with pytest.raises(ValueError, match="prv, rdp"):
        PrivacyAccountant(accountant="moments")


def test_prv_failure_is_reported_not_silent():
    """delta = 1e-12 with 10^5 steps: PRV's FFT round-off exceeds its delta error budget (its
    epsilon would be noise); the RDP bound is reported, with a warning that says so."""
    mechanisms = [Mechanism(4.0, Q, 100_000)]
    with pytest.warns(AccountingWarning, match="PRV accountant failed.*RDP upper bound"):
        eps = compute_epsilon(mechanisms, 1e-12)
    assert eps == compute_epsilon(mechanisms, 1e-12, "rdp")
    with pytest.warns(AccountingWarning, match="RDP"):  # epsilons beyond PRV_EPSILON_CUTOFF
        assert compute_epsilon([Mechanism(0.3, 0.05, 5000)], DELTA) == compute_epsilon([Mechanism(0.3, 0.05, 5000)],
                                                                                        DELTA, "rdp")


@pytest.mark.parametrize("sigma,delta", [(20.0, 1e-5), (2.0, 1e-5), (0.8, 1e-6)])
def test_full_batch_gaussian_matches_the_analytic_gaussian_mechanism(sigma, delta):
    # q = 1 (head_init's DP mean): no subsampling, so the exact curve is Balle & Wang's (2018)
    # delta(eps) = Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2), mu = 1/sigma. PRV may only
    # over-estimate, by at most its discretisation error.
    from scipy.optimize import brentq
    from scipy.stats import norm

    mu = 1 / sigma
    exact = brentq(lambda e: norm.cdf(-e / mu + mu / 2) - math.exp(e) * norm.cdf(-e / mu - mu / 2) - delta, 0, 100)
    got = compute_epsilon([Mechanism(sigma, 1.0, 1)], delta, "prv")
    assert exact <= got <= exact + 0.02
    assert compute_epsilon([Mechanism(sigma, 1.0, 1)], delta, "rdp") >= exact
