"""`dpc audit` end to end (white-box gradient canaries through the real DP engine): it has power
(non-private training is caught), does not cry wolf (correct DP at epsilon 1 on two ranks at ZeRO 2
stays below 1), and flags a broken mechanism (a tenth of the noise, the ledger unchanged)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.pipeline.test_train import ROOT, dpc, env

# N = 4,000 (1,000 of them canaries), q = 256 / 4,000, 64 steps; fixed seeds, so each outcome is fixed.
AUDIT = [str(ROOT / "configs" / "debug.yaml"), "data.synthetic_size=4000", "train.batch_size=256",
         "train.micro_batch_size=128", "train.epochs=4", "wandb.mode=disabled",
         "privacy.randomness=insecure_reproducible", "privacy.noise_seed=11"]


def audit_json(root, name):
    return json.loads((root / f"{name}-audit" / "audit" / "audit.json").read_text())


@pytest.mark.timeout(600)
def test_non_private_training_is_caught(tmp_path):
    proc = dpc(["audit", *AUDIT, f"run.output_dir={tmp_path}", "run.name=np", "privacy.enabled=false"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = audit_json(tmp_path, "np")
    assert out["claimed_epsilon"] is None and out["canaries"] == 1000
    assert out["epsilon_lb"] > 2, out["tests"]
    assert "empirical lower bound epsilon_lb" in proc.stdout
    # A second `dpc audit` of the same tree reports the first and trains nothing (no second spend).
    again = dpc(["audit", *AUDIT, f"run.output_dir={tmp_path}", "run.name=np", "privacy.enabled=false"])
    assert again.returncode == 0 and "already done" in again.stdout


@pytest.mark.timeout(600)
def test_correct_dp_on_two_ranks_at_zero2_stays_below_its_epsilon(tmp_path):
    from tests.engine.launch import torchrun

    out = torchrun("dist_dpc/train.py", ["--phase", "audit", *AUDIT, f"run.output_dir={tmp_path}", "run.name=dp",
                                         "privacy.target_epsilon=1", "train.zero_stage=2"], world_size=2, timeout=500)
    result = audit_json(tmp_path, "dp")
    assert result["world_size"] == 2 and result["zero_stage"] == 2 and result["clipping"] == "per_layer"
    assert result["claimed_epsilon"] == pytest.approx(1.0, abs=0.01)
    assert result["epsilon_lb"] <= result["claimed_epsilon"], result["tests"]
    ledger = json.loads((tmp_path / "dp-audit" / "privacy_ledger.json").read_text())
    assert list(ledger["phases"]) == ["audit"] and ledger["target_epsilon"] == pytest.approx(1.0)
    assert "FAILED" not in out.stdout


@pytest.mark.timeout(600)
def test_a_tenth_of_the_noise_is_flagged(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "pipeline" / "broken_noise_audit.py"), "audit", *AUDIT,
                           f"run.output_dir={tmp_path}", "run.name=broken", "privacy.target_epsilon=1"],
                          capture_output=True, text=True, timeout=500, env=env(), cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = audit_json(tmp_path, "broken")
    assert result["claimed_epsilon"] == pytest.approx(1.0, abs=0.01)
    assert result["epsilon_lb"] > result["claimed_epsilon"], result["tests"]
    assert "FAILED: the lower bound exceeds the claimed epsilon" in proc.stdout
    assert len(result["inclusion"]) == len(result["scores"]) == 1000 and result["included"] == sum(result["inclusion"])
    report = dpc(["report", str(tmp_path / "broken-audit")])
    assert report.returncode == 0, report.stderr[-2000:]
    text = (tmp_path / "broken-audit" / "report" / "privacy_report.md").read_text()
    assert f"epsilon_lb = {result['epsilon_lb']:.3f}" in text and "FAILED" in text


def test_more_canaries_than_examples_is_refused_naming_the_field(tmp_path):
    proc = dpc(["audit", *AUDIT, f"run.output_dir={tmp_path}", "run.name=small", "audit.canaries=5000"])
    assert proc.returncode == 2 and "audit.canaries=5000" in proc.stderr and "audit.canaries <= 2000" in proc.stderr
    proc = dpc(["audit", *AUDIT, f"run.output_dir={tmp_path}", "run.name=small", "audit.confidence=1.5"])
    assert proc.returncode == 2 and "audit.confidence" in proc.stderr
