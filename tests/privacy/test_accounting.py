"""Accounting against opacus' own accountants, driven step by step; calibration; the ledger."""

from __future__ import annotations

import json
import os

import pytest
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.utils import get_noise_multiplier

from dist_dpc.privacy.accounting import (Mechanism, PrivacyAccountant, calibrate_noise_multiplier, check_delta,
                                         compute_epsilon, max_steps_within_budget)
from dist_dpc.privacy.ledger import PrivacyBudgetExceeded, PrivacyLedger

DELTA = 1e-5
MECHANISMS = [Mechanism(1.1, 0.01, 300, "teacher"), Mechanism(0.8, 0.004, 500, "student"), Mechanism(1.1, 0.01, 200, "teacher")]


def opacus_epsilon(mechanisms, accountant):
    acc = PRVAccountant() if accountant == "prv" else RDPAccountant()
    for m in mechanisms:
        for _ in range(m.steps):
            acc.step(noise_multiplier=m.noise_multiplier, sample_rate=m.sample_rate)
    return acc.get_epsilon(delta=DELTA)


@pytest.mark.parametrize("accountant", ["prv", "rdp"])
@pytest.mark.parametrize("mechanisms", [MECHANISMS[:1], MECHANISMS], ids=["homogeneous", "heterogeneous"])
def test_epsilon_equals_opacus_stepwise(accountant, mechanisms):
    ours = compute_epsilon(mechanisms, DELTA, accountant)
    # PRV's discretisation depends on how the history is grouped: allow its 1 % eps_error budget.
    assert ours == pytest.approx(opacus_epsilon(mechanisms, accountant), rel=1e-2 if accountant == "prv" else 1e-9)


def test_composition_is_not_a_sum():
    parts = sum(compute_epsilon([m], DELTA) for m in MECHANISMS)
    assert compute_epsilon(MECHANISMS, DELTA) < parts


@pytest.mark.parametrize("accountant", ["prv", "rdp"])
@pytest.mark.parametrize("target", [1.0, 3.0, 8.0])
def test_calibration_hits_target(accountant, target):
    q, steps = 256 / 67349, 800
    sigma = calibrate_noise_multiplier(target, DELTA, q, steps, accountant)
    eps = compute_epsilon([Mechanism(sigma, q, steps)], DELTA, accountant)
    assert target * 0.99 <= eps <= target
    reference = get_noise_multiplier(target_epsilon=target, target_delta=DELTA, sample_rate=q, steps=steps,
                                     accountant=accountant, epsilon_tolerance=0.01)
    assert sigma == pytest.approx(reference, rel=0.03)


def test_calibration_with_prior_and_unreachable():
    prior = (Mechanism(1.0, 0.01, 500),)
    spent = compute_epsilon(prior, DELTA)
    sigma = calibrate_noise_multiplier(spent + 1.0, DELTA, 0.01, 500, prior=prior)
    assert compute_epsilon(prior + (Mechanism(sigma, 0.01, 500),), DELTA) == pytest.approx(spent + 1.0, rel=0.01)
    with pytest.raises(ValueError, match="already spent"):
        calibrate_noise_multiplier(spent * 0.9, DELTA, 0.01, 500, prior=prior)
    with pytest.raises(ValueError, match="fewer steps"):
        calibrate_noise_multiplier(1e-3, DELTA, 0.5, 2000, accountant="rdp")


def test_max_steps_is_tight():
    steps = max_steps_within_budget(1.0, 0.01, 2.0, DELTA, accountant="rdp")
    assert compute_epsilon([Mechanism(1.0, 0.01, steps)], DELTA, "rdp") <= 2.0
    assert compute_epsilon([Mechanism(1.0, 0.01, steps + 1)], DELTA, "rdp") > 2.0


def test_delta_rule():
    check_delta(1 / 1000 ** 1.1, 1000)
    with pytest.raises(ValueError, match="must be < 1/N"):
        check_delta(1 / 1000, 1000)


def test_live_accountant_merges_and_round_trips():
    acc = PrivacyAccountant(delta=DELTA, prior=MECHANISMS[:1], phase="student")
    for _ in range(10):
        acc.step(0.9, 0.02)
    acc.step(1.2, 0.02)
    assert [(m.noise_multiplier, m.steps) for m in acc.history] == [(0.9, 10), (1.2, 1)]
    again = PrivacyAccountant(delta=DELTA)
    again.load_state_dict(json.loads(json.dumps(acc.state_dict())))
    assert again.epsilon() == acc.epsilon() == compute_epsilon(MECHANISMS[:1] + acc.history, DELTA)


def test_ledger_composes_replaces_persists_and_refuses(tmp_path, monkeypatch):
    path = tmp_path / "ledger.json"
    ledger = PrivacyLedger(path, target_epsilon=4.0, delta=DELTA, dataset_size=20000)
    ledger.record("teacher", [MECHANISMS[0]], "completed")
    ledger.record("student", [MECHANISMS[1]], "running")
    ledger.record("student", [MECHANISMS[1]], "completed")  # resumed / re-run: replaced, not added
    assert ledger.total_epsilon() == compute_epsilon(MECHANISMS[:2], DELTA)
    reopened = PrivacyLedger(path, target_epsilon=4.0, delta=DELTA, dataset_size=20000)
    assert reopened.phases() == ledger.phases() and reopened.total_epsilon() == ledger.total_epsilon()
    assert reopened.to_dict()["total_epsilon_rdp"] >= reopened.total_epsilon()
    with pytest.raises(PrivacyBudgetExceeded, match="phase 'prune' would bring the run's total epsilon"):
        reopened.check_planned("prune", [Mechanism(0.3, 0.05, 5000)])
    reopened.check_planned("prune", [Mechanism(5.0, 0.001, 10)])
    sigma = reopened.calibrate_phase("prune", 0.01, 300, 4.0)
    total = compute_epsilon(MECHANISMS[:2] + [Mechanism(sigma, 0.01, 300)], DELTA)
    assert 3.96 <= total <= 4.0
    with pytest.raises(ValueError, match="bound to delta"):
        PrivacyLedger(path, target_epsilon=4.0, delta=DELTA / 2, dataset_size=20000)
    before = path.read_text()

    def crash(*a, **k):
        raise OSError("killed while writing")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        reopened.record("prune", [Mechanism(sigma, 0.01, 300)])
    assert path.read_text() == before  # the previous ledger is intact
    monkeypatch.undo()
    assert PrivacyLedger(path, target_epsilon=4.0, delta=DELTA, dataset_size=20000).total_epsilon() == ledger.total_epsilon()
