"""The per-run-tree privacy ledger: composition, idempotent replace, persistence, budget refusal, atomic writes."""

from __future__ import annotations

import json
import os

import pytest

from dist_dpc.privacy.accounting import Mechanism, compute_epsilon
from dist_dpc.privacy.ledger import PrivacyBudgetExceeded, PrivacyLedger

DELTA, N = 1e-5, 20000
TEACHER = Mechanism(1.1, 0.01, 300)
STUDENT = Mechanism(0.8, 0.004, 500)


def ledger(path, target=4.0, delta=DELTA, n=N):
    return PrivacyLedger(path, target_epsilon=target, delta=delta, dataset_size=n)


def test_total_is_the_composition_and_recording_again_replaces(tmp_path):
    led = ledger(tmp_path / "ledger.json")
    assert led.total_epsilon() == 0.0 and led.phases() == {}
    led.record("teacher", [TEACHER], "completed")
    led.record("student", [STUDENT], "running")
    total = led.total_epsilon()
    led.record("student", [STUDENT], "running")  # resumed / re-run: replaced, not added
    assert led.total_epsilon() == total
    led.record("student", [Mechanism(0.8, 0.004, 200), Mechanism(0.8, 0.004, 300)], "completed")
    assert led.total_epsilon() == total
    assert list(led.phases()) == ["teacher", "student"]
    assert led.phases()["student"]["status"] == "completed"
    # releases with the same (sigma, q) are one mechanism of their summed steps (composition commutes)
    assert [(m.phase, m.steps) for m in led.mechanisms()] == [("teacher", 300), ("student", 500)]
    # heterogeneous composition of everything recorded, strictly less than the per-phase sum
    assert total == compute_epsilon([TEACHER, STUDENT], DELTA)
    per_phase = compute_epsilon([TEACHER], DELTA) + compute_epsilon([STUDENT], DELTA)
    assert total < per_phase
    assert led.total_epsilon("rdp") == compute_epsilon([TEACHER, STUDENT], DELTA, "rdp") > total
    report = led.to_dict()
    assert report["total_epsilon_prv"] == total and report["total_epsilon_rdp"] > total
    assert report["delta"] == DELTA and report["dataset_size"] == N and report["target_epsilon"] == 4.0
    json.dumps(report)
    with pytest.raises(ValueError, match="status"):
        led.record("student", [STUDENT], "done")


def test_persists_across_instances_and_processes_phases(tmp_path):
    path = tmp_path / "run" / "privacy_ledger.json"
    first = ledger(path)
    first.record("teacher", [TEACHER], "completed")
    second = ledger(path)  # a later phase's process: loads, never resets
    assert second.phases() == first.phases()
    assert second.total_epsilon() == first.total_epsilon()
    second.record("student", [STUDENT])
    # the first instance sees the other writer's phase; its own next record keeps it
    assert first.total_epsilon() == compute_epsilon([TEACHER, STUDENT], DELTA)
    first.record("teacher", [TEACHER], "completed")
    assert set(ledger(path).phases()) == {"teacher", "student"}


def test_bound_to_one_dataset_and_delta(tmp_path):
    path = tmp_path / "ledger.json"
    ledger(path).record("teacher", [TEACHER])
    with pytest.raises(ValueError, match="bound to delta"):
        ledger(path, delta=DELTA / 2)
    with pytest.raises(ValueError, match="N=20000"):
        ledger(path, n=N + 1)
    assert ledger(path, target=8.0).total_epsilon() == compute_epsilon([TEACHER], DELTA)  # a new target is fine


def test_check_planned_refuses_over_budget(tmp_path):
    led = ledger(tmp_path / "ledger.json")
    led.record("teacher", [TEACHER], "completed")
    with pytest.raises(PrivacyBudgetExceeded) as err:
        led.check_planned("prune", [Mechanism(0.7, 0.01, 3000)])  # total ~7.6
    message = str(err.value)
    assert "'prune'" in message and "privacy.target_epsilon=4" in message
    assert "noise" in message and "fewer steps" in message and "larger privacy.target_epsilon" in message
    assert "split" in message
    planned = [Mechanism(5.0, 0.001, 10)]
    assert led.check_planned("prune", planned) == compute_epsilon([TEACHER] + planned, DELTA)
    # a phase's own earlier entry is not counted against its new plan
    led.record("prune", [Mechanism(0.9, 0.01, 1000)])
    assert led.check_planned("prune", planned) == compute_epsilon([TEACHER] + planned, DELTA)
    assert PrivacyLedger(tmp_path / "none.json", None, DELTA, N).check_planned("x", [Mechanism(0.6, 0.05, 500)]) > 4


def test_calibrate_phase_hits_the_cumulative_target(tmp_path):
    led = ledger(tmp_path / "ledger.json")
    # 50/50 split of epsilon = 4: the teacher to cumulative 2.0, then the student to cumulative 4.0
    q, steps = 0.01, 400
    sigma_teacher = led.calibrate_phase("teacher", q, steps, 2.0)
    led.record("teacher", [Mechanism(sigma_teacher, q, steps)], "completed")
    assert 2.0 * 0.99 <= led.total_epsilon() <= 2.0
    sigma_student = led.calibrate_phase("student", q, steps, 4.0)
    led.record("student", [Mechanism(sigma_student, q, steps)], "running")
    assert 4.0 * 0.99 <= led.total_epsilon() <= 4.0
    led.check_planned("student", [Mechanism(sigma_student, q, steps)])
    # re-calibrating a recorded phase excludes its own entry
    assert led.calibrate_phase("student", q, steps, 4.0) == pytest.approx(sigma_student, rel=0.01)
    with pytest.raises(ValueError, match="phase 'student'.*exceeds"):
        led.calibrate_phase("student", q, steps, 5.0)


def test_crash_mid_write_keeps_the_previous_ledger(tmp_path, monkeypatch):
    path = tmp_path / "ledger.json"
    led = ledger(path)
    led.record("teacher", [TEACHER], "completed")
    before_text, before_total = path.read_text(), led.total_epsilon()

    def killed(*args, **kwargs):
        raise OSError("killed while writing")

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(OSError, match="killed"):
        led.record("student", [STUDENT])
    monkeypatch.undo()
    assert path.read_text() == before_text  # the previous ledger is intact ...
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ledger.json", "ledger.json.lock"]  # ... no temp left
    assert led.total_epsilon() == before_total  # ... and the failed record is not half-applied
    reloaded = ledger(path)
    assert list(reloaded.phases()) == ["teacher"] and reloaded.total_epsilon() == before_total


def test_a_ledger_of_a_newer_format_is_refused_not_rewritten(tmp_path):
    """A newer dist-dpc may store fields this one would drop on rewriting (format 3 added the run count
    and output_at_step that keep a resume from undercounting or replaying noise)."""
    path = tmp_path / "ledger.json"
    ledger = PrivacyLedger(path, 4.0, 1e-5, 1000)
    ledger.record("train", [Mechanism(1.0, 0.01, 10)])
    ledger.start_run("train")
    ledger.note_output("train", 7)
    entry = PrivacyLedger(path, 4.0, 1e-5, 1000).entry("train")  # kept by a reader of this format
    assert entry["runs"] == 1 and entry["output_at_step"] == 7
    data = json.loads(path.read_text())
    data["version"] += 1
    path.write_text(json.dumps(data))
    with pytest.raises(RuntimeError, match="newer than this dist-dpc reads"):
        PrivacyLedger(path, 4.0, 1e-5, 1000)
    assert json.loads(path.read_text()) == data
