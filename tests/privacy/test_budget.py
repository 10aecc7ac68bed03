"""PhaseBudget: reservation under the ledger lock, releases recorded as they happen, attempts appended.

References: opacus' PRV accountant driven directly over the ledger's mechanisms; a second process
reserving at the same moment.
"""

from __future__ import annotations

import multiprocessing as mp

import pytest

from dist_dpc.privacy.accounting import Mechanism, compute_epsilon
from dist_dpc.privacy.budget import PhaseBudget
from dist_dpc.privacy.ledger import PrivacyBudgetExceeded, PrivacyLedger

DELTA, N, TARGET = 1e-5, 20000, 4.0
Q, STEPS = 0.01, 300
MEAN = Mechanism(20.0, 1.0, 1)


def ledger(path, target=TARGET):
    return PrivacyLedger(path, target_epsilon=target, delta=DELTA, dataset_size=N)


def opacus_prv(mechanisms: list[Mechanism]) -> float:
    from opacus.accountants import PRVAccountant

    acc = PRVAccountant()
    acc.history = [(m.noise_multiplier, m.sample_rate, m.steps) for m in mechanisms]
    return acc.get_epsilon(delta=DELTA)


def test_releases_become_the_count_and_match_opacus(tmp_path):
    led = ledger(tmp_path / "l.json")
    budget = PhaseBudget.reserve(led, "teacher", sample_rate=Q, steps=STEPS, fixed=(MEAN,), target_epsilon=2.0)
    assert budget.entry == "teacher" and led.entry("teacher")["status"] == "running"
    # the reservation (mean + all steps) counts while running
    assert 2.0 * 0.99 <= led.total_epsilon() <= 2.0
    assert budget.prior() == ()
    budget.release(MEAN)
    budget.release(budget.dp_sgd(40))  # a probe
    assert [m.steps for m in budget.prior()] == [1, 40]  # what the fine-tuning composes with
    budget.release(budget.dp_sgd(STEPS - 40))
    counted = budget.complete()
    assert [(m.noise_multiplier, m.sample_rate, m.steps) for m in counted] == [
        (20.0, 1.0, 1), (budget.noise_multiplier, Q, STEPS)]
    assert led.total_epsilon() == pytest.approx(opacus_prv(counted), abs=0.02)
    # a second phase composes with the first
    student = PhaseBudget.reserve(led, "distill", sample_rate=Q, steps=STEPS, target_epsilon=TARGET)
    assert [m.phase for m in student.prior()] == ["teacher", "teacher"]
    student.release(student.dp_sgd(STEPS))
    student.complete()
    assert TARGET * 0.99 <= led.total_epsilon() <= TARGET
    assert led.total_epsilon() == pytest.approx(opacus_prv(led.mechanisms()), abs=0.02)


def test_a_rerun_appends_an_attempt_and_never_resets_spend(tmp_path):
    led = ledger(tmp_path / "l.json", target=8.0)
    first = PhaseBudget.reserve(led, "teacher", sample_rate=Q, steps=STEPS, target_epsilon=4.0)
    first.release(first.dp_sgd(STEPS))
    first.complete()
    spent = led.total_epsilon()
    # a target the first attempt already spent: the re-run is refused, nothing is reset ...
    with pytest.raises(ValueError, match="unreachable"):
        PhaseBudget.reserve(led, "teacher", sample_rate=Q, steps=STEPS, target_epsilon=spent)
    assert list(led.phases()) == ["teacher"] and led.total_epsilon() == spent
    # ... with room left it is a new attempt that composes with the old one
    second = PhaseBudget.reserve(led, "teacher", sample_rate=Q, steps=STEPS, target_epsilon=8.0)
    assert second.entry == "teacher#2" and second.attempt == 2
    assert led.entry("teacher")["status"] == "completed"
    second.release(second.dp_sgd(STEPS))
    second.complete()
    assert led.total_epsilon() == pytest.approx(
        compute_epsilon([first.dp_sgd(STEPS), second.dp_sgd(STEPS)], DELTA))
    # a completed entry is permanent
    with pytest.raises(ValueError, match="completed"):
        led.record("teacher", [Mechanism(5.0, Q, 1)], "completed")
    with pytest.raises(ValueError, match="completed"):
        led.release("teacher", [Mechanism(5.0, Q, 1)])


def test_a_resumed_attempt_keeps_its_entry_and_sigma(tmp_path):
    led = ledger(tmp_path / "l.json")
    first = PhaseBudget.reserve(led, "teacher", sample_rate=Q, steps=STEPS, target_epsilon=2.0)
    first.release(MEAN)
    other = PhaseBudget.reserve(led, "distill", sample_rate=Q, steps=10, noise_multiplier=5.0)
    resumed = PhaseBudget.reserve(led, "teacher", sample_rate=Q, steps=STEPS, target_epsilon=2.0)
    assert resumed.entry == "teacher" and resumed.noise_multiplier == first.noise_multiplier
    assert resumed.released() == [Mechanism(20.0, 1.0, 1, "teacher")]
    joined = PhaseBudget.join(led, "teacher")
    assert (joined.entry, joined.noise_multiplier, joined.writer) == ("teacher", first.noise_multiplier, False)
    joined.release(MEAN)  # a non-writing rank records nothing
    assert len(led.released("teacher")) == 1
    assert other.entry == "distill"


def test_a_fixed_sigma_over_the_cumulative_target_is_refused(tmp_path):
    led = ledger(tmp_path / "l.json")
    with pytest.raises(PrivacyBudgetExceeded, match="noise_multiplier"):
        PhaseBudget.reserve(led, "teacher", sample_rate=Q, steps=STEPS, target_epsilon=1.0, noise_multiplier=0.7)
    assert led.phases() == {}


def _reserve_in_process(path: str, phase: str, barrier, results) -> None:
    led = ledger(path)
    barrier.wait()
    try:
        budget = PhaseBudget.reserve(led, phase, sample_rate=Q, steps=STEPS, target_epsilon=TARGET)
        results.put((phase, budget.noise_multiplier))
    except (ValueError, PrivacyBudgetExceeded) as err:
        results.put((phase, str(err)))


def test_two_phases_started_at_once_cannot_overspend(tmp_path):
    """Each process may spend the whole target on its own; together they must not. Reservation under
    the lock makes the second calibrate against the first's plan."""
    path = str(tmp_path / "l.json")
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_reserve_in_process, args=(path, phase, barrier, results))
             for phase in ("teacher", "distill")]
    for p in procs:
        p.start()
    outcomes = dict(results.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    sigmas = sorted(outcomes.values())
    assert all(isinstance(s, float) for s in sigmas), outcomes
    # the one that reserved second calibrated against the first's whole plan: far more noise ...
    assert sigmas[1] > 3 * sigmas[0]
    # ... and together they stay within the target (calibrating both against an empty ledger would
    # have given both the first's sigma and a total far above it)
    assert ledger(path).total_epsilon() <= TARGET * (1 + 1e-6)
    assert compute_epsilon([Mechanism(sigmas[0], Q, STEPS)] * 2, DELTA) > 1.2 * TARGET


def test_a_running_entry_counts_more_than_its_reservation_if_it_released_more(tmp_path):
    led = ledger(tmp_path / "l.json")
    budget = PhaseBudget.reserve(led, "teacher", sample_rate=Q, steps=STEPS, fixed=(MEAN,), target_epsilon=2.0)
    reserved = led.total_epsilon()
    budget.release(MEAN, MEAN)  # e.g. the DP mean recomputed after a crash: two releases, one reserved
    assert [(m.noise_multiplier, m.steps) for m in led.mechanisms()] == [(20.0, 2), (budget.noise_multiplier, STEPS)]
    assert led.total_epsilon() > reserved


def test_too_small_a_data_set_is_refused_with_the_smallest_epsilon(tmp_path):
    from dist_dpc.privacy.accounting import Mechanism, compute_epsilon

    led = PrivacyLedger(tmp_path / "ledger.json", 0.5, 1e-4, 400)
    # 400 examples, batch 8 (q = 0.02), 100 steps at epsilon 0.5 needs sigma ~ 2.5: noise 0.3 x C per
    # coordinate of each averaged gradient, above the 0.1 limit.
    with pytest.raises(ValueError, match="too small") as err:
        PhaseBudget.reserve(led, "teacher", sample_rate=0.02, steps=100, target_epsilon=0.5,
                            expected_batch_size=8, max_effective_noise=0.1)
    floor = compute_epsilon([Mechanism(0.8, 0.02, 100)], 1e-4)  # sigma = 0.1 x 8
    assert f"{floor:.3g}" in str(err.value) and "privacy.max_effective_noise" in str(err.value)
    assert led.phases() == {}  # nothing reserved, nothing spent
    # At that epsilon the same run is accepted.
    PhaseBudget.reserve(led.__class__(tmp_path / "l2.json", floor * 1.01, 1e-4, 400), "teacher", sample_rate=0.02,
                        steps=100, target_epsilon=floor * 1.01, expected_batch_size=8, max_effective_noise=0.1)


def test_a_resumed_attempt_whose_plan_changed_still_counts_what_it_released(tmp_path):
    """A DP mean released at sigma 5, then the attempt resumed with a plan at sigma 20 (its default
    sigma depends on N: the data behind the config changed between crash and resume): the entry must
    keep counting the sigma-5 release, and the total must be at least the released one's."""
    led = ledger(tmp_path / "l.json", target=8.0)
    first = PhaseBudget.reserve(led, "teacher", sample_rate=Q, steps=STEPS, fixed=(Mechanism(5.0, 1.0, 1, "teacher"),),
                                target_epsilon=4.0)
    first.release(Mechanism(5.0, 1.0, 1, first.entry))
    resumed = PhaseBudget.reserve(led, "teacher", sample_rate=Q, steps=STEPS,
                                  fixed=(Mechanism(20.0, 1.0, 1, "teacher"),), target_epsilon=4.0)
    counted = [(m["noise_multiplier"], m["sample_rate"], m["steps"]) for m in led.entry(resumed.entry)["mechanisms"]]
    assert (5.0, 1.0, 1) in counted and (20.0, 1.0, 1) in counted
    alone = compute_epsilon([Mechanism(5.0, 1.0, 1, "x"), Mechanism(resumed.noise_multiplier, Q, STEPS, "x")],
                            led.delta, "prv")
    assert led.total_epsilon() >= alone * (1 - 1e-9)
