"""`dpc tune` end to end through the real CLI on a debug model: the private selection's cost in the
ledger (checked against the theorem and the trials' own spend), only the winner released, the
selected values applied by the next phase; the public-proxy mode; refusals."""

from __future__ import annotations

import json
import re

import numpy as np

from dist_dpc.pipeline.config import mean_noise_for
import pytest

from dist_dpc.privacy.accounting import Mechanism, epsilon_from_rdp, mechanism_from_dict, rdp_of, rdp_orders
from dist_dpc.privacy.selection import selection_rdp
from tests.pipeline.test_phases import CONFIG, TINY, ok
from tests.pipeline.test_train import dpc

SEARCH = "tune.search={train.lr: [0.001, 0.01], train.max_steps: [3, 5]}"


@pytest.mark.timeout(900)
def test_private_tune_then_teacher_in_one_tree(tmp_path):
    # head_init at its default (auto: on for this BERT-style model): each trial runs the DP mean
    # and the probe, which its curve must include.
    args = [CONFIG, f"run.output_dir={tmp_path}", "run.name=t", *TINY, "privacy.target_epsilon=8", SEARCH,
            "tune.expected_trials=2", "pipeline.phases=[tune, teacher]",
            "pipeline.budget_split={tune: 0.5, teacher: 0.5}", "head_init.centre_pooler=null",
            "head_init.probe_epochs=null"]
    proc = ok(dpc(["pipeline", *args], timeout=800))
    run = tmp_path / "t"
    ledger = json.loads((run / "privacy_ledger.json").read_text())
    assert list(ledger["phases"]) == ["tune", "teacher"]
    (curve,) = ledger["phases"]["tune"]["mechanisms"]
    assert curve["kind"] == "rdp_curve"
    stored = ledger["phases"]["tune"]["reservation"]
    trial_rdp = np.asarray(stored["trial_rdp"])
    # Every candidate's trial (head_init's DP mean, then its probe (2 epochs) and DP-SGD at the
    # calibrated sigma, on the training part, plus the Gaussian score) lies under the common per-trial
    # curve the selection was accounted with, and the curve is the largest of them (nothing wasted).
    selection = json.loads((run / "tune" / "results.json").read_text())
    n_train = ledger["dataset_size"] - selection["holdout_examples"]
    score = np.asarray(rdp_orders()) / (2 * stored["score_noise_multiplier"] ** 2)
    probe = 2 * -(-n_train // 24)
    owns = []
    for values, sigma in zip(stored["search"], stored["noise_multipliers"]):
        owns.append(rdp_of([Mechanism(mean_noise_for(n_train, 32), 1.0, 1),
                            Mechanism(sigma, 24 / n_train, values["train.max_steps"] + probe)])
                    + score)
        assert np.all(owns[-1] <= trial_rdp * (1 + 1e-9))
    assert np.allclose(np.max(owns, axis=0), trial_rdp, rtol=1e-9)
    # The ledger's curve is Theorem 2 applied to it; the selection alone spends the tune share (4 of 8).
    assert np.allclose(curve["rdp"], selection_rdp(trial_rdp, stored["eta"], stored["gamma"]))
    assert 3.9 <= epsilon_from_rdp(np.asarray(curve["rdp"]), ledger["delta"]) <= 4.0 + 1e-6
    # The teacher composed with it (RDP, since a curve is in the ledger) up to the whole target.
    teacher = json.loads((run / "teacher" / "results.json").read_text())
    total = epsilon_from_rdp(sum(rdp_of([mechanism_from_dict(m)]) for e in ledger["phases"].values()
                                 for m in e["mechanisms"]), ledger["delta"])
    assert teacher["epsilon"] == pytest.approx(total, rel=1e-9) and 7.9 <= total <= 8.0 * (1 + 1e-6)
    # Only the winner is released: no trial directory or log is left, and nothing printed names a trial.
    assert not (run / "tune" / ".trials").exists()
    assert (run / "tune" / "model" / "privacy_lineage.json").is_file()
    out = proc.stdout + proc.stderr
    assert "trial-" not in out and "trials.log" not in out
    assert selection["selected"] in stored["search"]
    shown = ", ".join(f"{k}={v}" for k, v in selection["selected"].items())
    assert f"[teacher] tuned values from {run / 'tune'}: {shown}" in proc.stdout
    assert teacher["steps"] == selection["selected"]["train.max_steps"]


@pytest.mark.timeout(900)
def test_public_proxy_tune_costs_nothing_and_refusals(tmp_path):
    base = [CONFIG, f"run.output_dir={tmp_path}", *TINY, "privacy.target_epsilon=4",
            "tune.search={train.lr: [0.001, 0.01]}"]
    proxy = ["tune.mode=public_proxy", "tune.proxy_data={seed: 5, synthetic_size: 160}"]
    ok(dpc(["tune", *base, "run.name=p", *proxy], timeout=600))
    run = tmp_path / "p"
    selection = json.loads((run / "tune" / "results.json").read_text())
    assert [r["values"] for r in selection["trials"]] == [{"train.lr": 0.001}, {"train.lr": 0.01}]
    best = max(selection["trials"], key=lambda r: r["proxy_accuracy"])
    assert selection["selected"] == best["values"] and selection["epsilon_selection"] == 0.0
    ledger = json.loads((run / "privacy_ledger.json").read_text())
    (name,) = ledger["phases"]
    assert name.startswith("public_proxy:") and ledger["phases"][name]["mechanisms"] == []
    # The trials trained on the proxy's 160 examples, not on the 240 private ones.
    assert json.loads((run / "tune" / "trials" / "candidate-0" / "results.json").read_text())["dataset_size"] == 160

    # Refusals, in process (each is refused before any private example is used).
    from dist_dpc.pipeline.config import load_config
    from dist_dpc.pipeline.tune import run_tune
    from dist_dpc.utils.config_loader import ConfigError

    refusals = [
        (["tune.search={}"], "tune.search is empty"),
        (["tune.search={distill.alpha: [0.1, 0.9]}"], "each trial is a `dpc train` run"),
        (["tune.mode=public_proxy", "tune.proxy_data={synthetic_size: 240}"], "names the private training data"),
        (["tune.search={train.batch_size: [500]}"], "not below"),
        (["tune.search={privacy.target_epsilon: [1, 2]}"], "privacy, data and run are fixed"),
        # what a trial would refuse is refused before the selection reserves anything
        (["model.name=tiny-gpt2", "tune.search={head_init.probe_epochs: [0, 1]}"], "needs a BERT-style classifier"),
        (["model.task=causal_lm", "model.name=tiny-llama"], "tune is not supported for model.task='causal_lm'"),
        (["tune.search={model.task: [sequence_classification, causal_lm]}"], "model.task is fixed"),
    ]
    for i, (extra, message) in enumerate(refusals):
        with pytest.raises((ValueError, ConfigError), match=re.escape(message)):
            run_tune(load_config(CONFIG, [*base[1:], f"run.name=r{i}", *extra]))
        ledger = tmp_path / f"r{i}" / "privacy_ledger.json"
        assert not ledger.exists() or not json.loads(ledger.read_text())["phases"], extra


def test_trial_guard_counts_the_score_and_only_the_trials_own_training(tmp_path):
    from dist_dpc.pipeline.tune import _check_trial, score_rdp

    sgd = Mechanism(1.2, 0.05, 40, "train")
    imported = Mechanism(0.8, 0.05, 100, "imported:model")  # model.name's cost: the tree's, not the trial's
    (tmp_path / "privacy_ledger.json").write_text(json.dumps({"phases": {
        "imported:/m": {"phase": "imported:/m", "status": "completed", "mechanisms": [imported.to_dict()]},
        "train": {"phase": "train", "status": "completed", "mechanisms": [sgd.to_dict()]}}}))
    score = score_rdp(4.0)
    _check_trial(tmp_path, rdp_of([sgd]) + score, score)  # exactly at the curve: accepted
    with pytest.raises(RuntimeError, match="more than its accounted"):
        _check_trial(tmp_path, rdp_of([sgd]) + score * 0.5, score)  # the score does not fit


def test_public_proxy_naming_the_private_file_another_way_is_refused(tmp_path):
    from dist_dpc.pipeline.tune import _same_source

    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "train.csv").write_text("text,label\nx,0\n")
    (tmp_path / "b.csv").write_text("text,label\nx,0\n")  # a copy elsewhere: same content
    private = {"task": "csv", "train_file": str(tmp_path / "a" / "train.csv"), "data_dir": None}
    assert _same_source({"task": "csv", "train_file": str(tmp_path / "a" / ".." / "a" / "train.csv"),
                         "data_dir": "/elsewhere"}, private)
    assert _same_source({"task": "csv", "train_file": str(tmp_path / "b.csv")}, private)
    (tmp_path / "c.csv").write_text("text,label\ny,1\n")
    assert not _same_source({"task": "csv", "train_file": str(tmp_path / "c.csv")}, private)
