"""`dpc audit` end to end (white-box gradient canaries through the real DP engine): it has power
(non-private training is caught), does not cry wolf (correct DP at epsilon 1 on two ranks at ZeRO 2
stays below 1), and flags a broken mechanism (a tenth of the noise, the ledger unchanged)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from tests.pipeline.test_train import ROOT, dpc, env

# N = 4,000 (1,000 of them canaries), q = 256 / 4,000, 64 steps; fixed seeds, so each outcome is fixed.
AUDIT = [str(ROOT / "configs" / "debug.yaml"), "data.synthetic_size=4000", "train.batch_size=256",
         "train.micro_batch_size=256", "train.epochs=4", "wandb.mode=disabled",
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
    assert "epsilon_lb = " in proc.stdout
    assert not (tmp_path / "np-audit" / "cache").exists()  # the private data was read for N only
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
    assert "FAILED: the canaries reject the accounted mechanism" in proc.stdout and result["claim_rejected"]
    assert len(result["inclusion"]) == len(result["scores"]["final_weight"]) == 1000
    assert result["included"] == sum(result["inclusion"]) and result["ceiling"] > 3
    report = dpc(["report", str(tmp_path / "broken-audit")])
    assert report.returncode == 0, report.stderr[-2000:]
    text = (tmp_path / "broken-audit" / "report" / "privacy_report.md").read_text()
    assert f"epsilon_lb = {result['epsilon_lb']:.3f}" in text and "FAILED" in text


def test_more_canaries_than_examples_is_refused_naming_the_field(tmp_path):
    proc = dpc(["audit", *AUDIT, f"run.output_dir={tmp_path}", "run.name=small", "audit.canaries=5000"])
    assert proc.returncode == 2 and "audit.canaries=5000" in proc.stderr and "audit.canaries <= 2000" in proc.stderr
    proc = dpc(["audit", *AUDIT, f"run.output_dir={tmp_path}", "run.name=small", "audit.confidence=1.5"])
    assert proc.returncode == 2 and "audit.confidence" in proc.stderr


@pytest.mark.timeout(600)
def test_recorded_noisy_gradients_are_the_updates_at_zero3_on_two_ranks(tmp_path):
    """The likelihood-ratio statistic reads every step's released gradient from the optimizer's
    partitions; with plain SGD (no noise, constant lr, no weight decay) their sum must be exactly the
    final weights, coordinate by coordinate, so the partitions were put together in the right order."""
    from tests.engine.launch import torchrun

    torchrun("dist_dpc/train.py", ["--phase", "audit", *AUDIT, f"run.output_dir={tmp_path}", "run.name=z3",
                                   "privacy.enabled=false", "train.zero_stage=3", "train.optimizer=sgd",
                                   "train.weight_decay=0", "train.epochs=2"], world_size=2, timeout=500)
    result = audit_json(tmp_path, "z3")
    assert result["zero_stage"] == 3 and result["world_size"] == 2
    final, summed = (np.array(result["scores"][k]) for k in ("final_weight", "likelihood_ratio"))
    lr, clip, batch = 5e-3, 1.0, 256  # configs/debug.yaml's lr, the default max_grad_norm, AUDIT's batch
    np.testing.assert_allclose(final, summed * lr * clip / batch, rtol=1e-6, atol=1e-6)
    assert np.abs(final).max() > 1 and (final == 0).sum() > 300  # excluded canaries' weights never move


@pytest.mark.slow  # `make test-slow` (keeps make test under 20 minutes; the white-box tests above stay)
@pytest.mark.timeout(600)
def test_black_box_canaries_through_the_users_own_model(tmp_path):
    """Random-label texts added to the private set of the config's own model, scored by how much
    training lowered their loss: memorised without privacy, so the bound is positive."""
    common = [str(ROOT / "configs" / "debug.yaml"), f"run.output_dir={tmp_path}", "audit.kind=black_box",
              "audit.canaries=200", "data.synthetic_size=1000", "train.epochs=6", "wandb.mode=disabled",
              "privacy.randomness=insecure_reproducible", "privacy.noise_seed=11"]
    # head_init's probe on: it reads the training set's labels, the canaries' included
    proc = dpc(["audit", *common, "run.name=np", "privacy.enabled=false", "head_init.probe_epochs=1"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = audit_json(tmp_path, "np")
    assert result["kind"] == "black_box" and len(result["scores"]["score"]) == 200
    assert result["epsilon_lb"] > 0, result["tests"]


@pytest.mark.slow  # `make test-slow`: the same, with DP (black-box bounds are loose: it stays far below)
@pytest.mark.timeout(600)
def test_black_box_canaries_under_dp_stay_below_the_claim(tmp_path):
    common = [str(ROOT / "configs" / "debug.yaml"), f"run.output_dir={tmp_path}", "audit.kind=black_box",
              "audit.canaries=200", "data.synthetic_size=1000", "train.epochs=6", "wandb.mode=disabled",
              "privacy.randomness=insecure_reproducible", "privacy.noise_seed=11"]
    proc = dpc(["audit", *common, "run.name=dp", "privacy.target_epsilon=2"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = audit_json(tmp_path, "dp")
    assert result["claimed_epsilon"] == pytest.approx(2.0, abs=0.02)
    assert result["epsilon_lb"] <= result["claimed_epsilon"]
    ledger = json.loads((tmp_path / "dp-audit" / "privacy_ledger.json").read_text())
    assert list(ledger["phases"]) == ["audit"]
