"""`dpc submit --executor local`: the phases run as a real submitit job (a separate process), in order;
`dpc status` follows them; re-submitting skips completed training phases."""

from __future__ import annotations

import json
import time

import pytest

from tests.pipeline.test_phases import CONFIG, TINY, ok
from tests.pipeline.test_train import dpc


def final_status(run, timeout: float) -> str:
    """`dpc status` output once the job has ended (COMPLETED or FAILED), or the last one at the deadline."""
    deadline = time.time() + timeout
    while True:
        status = ok(dpc(["status", str(run)])).stdout
        if "COMPLETED" in status or "FAILED" in status or time.time() > deadline:
            return status
        time.sleep(2)


@pytest.mark.timeout(600)
def test_local_submission_runs_the_phases_in_order_and_resumes(tmp_path):
    args = [CONFIG, f"run.output_dir={tmp_path}", "run.name=sub", *TINY, "privacy.target_epsilon=5",
            "pipeline.phases=[teacher, distill, eval]", "cluster.executor=local"]
    out = ok(dpc(["submit", *args, "--phases", "teacher,distill"])).stdout
    assert "submitted teacher+distill" in out and "dpc status" in out
    run = tmp_path / "sub"
    status = final_status(run, timeout=400)
    assert "COMPLETED" in status, status + "".join(p.read_text()[-2000:] for p in (run / "jobs").glob("*.err"))
    ledger = json.loads((run / "privacy_ledger.json").read_text())
    assert [n for n in ledger["phases"]] == ["teacher", "distill"]
    assert all(e["status"] == "completed" for e in ledger["phases"].values())
    # Re-submitting the whole pipeline: teacher and distill are done, only eval is left to run.
    again = ok(dpc(["submit", *args])).stdout
    records = json.loads((run / "jobs.json").read_text())
    assert [(r["phase"], r["executor"]) for r in records] == [("teacher", "done"), ("distill", "done"), ("eval", "local")]
    assert "submitted eval" in again


@pytest.mark.timeout(300)
def test_status_reports_a_failed_local_job(tmp_path):
    # The model directory does not exist: the job fails when it loads it, after submission.
    args = [CONFIG, f"run.output_dir={tmp_path}", "run.name=bad", *TINY, "privacy.target_epsilon=5",
            "pipeline.phases=[teacher]", "cluster.executor=local", f"model.name={tmp_path / 'no-such-model'}"]
    ok(dpc(["submit", *args]))
    run = tmp_path / "bad"
    status = final_status(run, timeout=200)
    assert "FAILED" in status, status
    assert not (run / "teacher" / "results.json").exists()
