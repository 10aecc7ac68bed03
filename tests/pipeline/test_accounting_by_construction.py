"""Accounting by construction, end to end: re-runs append attempts (never reset spend, never replay
noise), and a model loaded from any directory brings its privacy lineage or is refused."""

from __future__ import annotations

import json
import shutil

import pytest
from safetensors.torch import load_file

from dist_dpc.privacy.accounting import Mechanism, compute_epsilon
from tests.pipeline.test_phases import ok, opacus_prv_epsilon
from tests.pipeline.test_train import BASE, ROOT, dpc

CONFIG = str(ROOT / "configs" / "debug.yaml")
# A fixed sigma: both attempts use the same noise scale, so only the draws can tell them apart.
FIXED = [*BASE, "privacy.noise_multiplier=1.0", "privacy.target_epsilon=20", "train.max_steps=4",
         "wandb.mode=disabled", "model.dropout=0"]


def ledger_of(run):
    return json.loads((run / "privacy_ledger.json").read_text())


@pytest.mark.timeout(600)
def test_an_overwritten_phase_is_a_new_attempt_with_new_noise(tmp_path):
    run = tmp_path / "r"
    args = ["train", CONFIG, f"run.output_dir={tmp_path}", "run.name=r", *FIXED]
    ok(dpc(args))
    first = load_file(run / "model" / "model.safetensors")
    (run / "checkpoints").mkdir(exist_ok=True)  # a stale checkpoint dir of attempt 1 must not be resumed
    ok(dpc([*args, "run.overwrite=true"]))
    second = load_file(run / "model" / "model.safetensors")
    ledger = ledger_of(run)
    assert list(ledger["phases"]) == ["train", "train#2"]
    assert all(e["status"] == "completed" for e in ledger["phases"].values())
    one = [Mechanism.from_dict(m) for e in ledger["phases"].values() for m in e["mechanisms"]]
    assert [(m.noise_multiplier, m.steps) for m in one] == [(1.0, 4), (1.0, 4)]
    # the spend of both attempts composes; nothing was reset
    results = json.loads((run / "results.json").read_text())
    assert results["ledger_entry"] == "train#2"
    assert results["epsilon"] == pytest.approx(compute_epsilon(one, ledger["delta"]), rel=1e-6)
    assert results["epsilon"] > 1.3 * compute_epsilon(one[:1], ledger["delta"])
    # same seed (insecure_reproducible), same data, same sigma: only the attempt's key differs, and the
    # trained weights differ, so the second attempt did not replay the first one's noise
    assert any(not (first[k] == second[k]).all() for k in first)


@pytest.mark.timeout(600)
def test_a_dpc_train_model_brings_its_lineage_and_unknown_directories_are_refused(tmp_path):
    ok(dpc(["train", CONFIG, f"run.output_dir={tmp_path}", "run.name=a", *FIXED]))
    model_dir = tmp_path / "a" / "model"
    lineage = json.loads((model_dir / "privacy_lineage.json").read_text())
    assert lineage["private"] and lineage["dataset_size"] == ledger_of(tmp_path / "a")["dataset_size"]
    trained = [Mechanism.from_dict(m) for m in lineage["mechanisms"]]

    # used as the teacher of another tree (and as model.name of a third): its cost is imported
    distill = ["pipeline", CONFIG, f"run.output_dir={tmp_path}", "run.name=b", *FIXED, "pipeline.phases=[distill]",
               f"distill.teacher={model_dir}"]
    ok(dpc(distill))
    ledger = ledger_of(tmp_path / "b")
    assert list(ledger["phases"]) == [f"imported:{model_dir.resolve()}", "distill"]
    everything = [m for e in ledger["phases"].values() for m in e["mechanisms"]]
    results = json.loads((tmp_path / "b" / "distill" / "results.json").read_text())
    assert results["epsilon"] == pytest.approx(opacus_prv_epsilon(everything, ledger["delta"]), rel=0.02)
    assert results["epsilon"] > compute_epsilon(trained, ledger["delta"])

    # a copy of the directory elsewhere (e.g. an export someone moved) still carries it
    moved = tmp_path / "elsewhere" / "m"
    shutil.copytree(model_dir, moved)
    ok(dpc(["train", CONFIG, f"run.output_dir={tmp_path}", "run.name=c", *FIXED, f"model.name={moved}"]))
    assert list(ledger_of(tmp_path / "c")["phases"]) == [f"imported:{moved.resolve()}", "train"]

    # without a lineage the origin is unknown: refused before training, unless declared public
    (moved / "privacy_lineage.json").unlink()
    refused = dpc(["train", CONFIG, f"run.output_dir={tmp_path}", "run.name=d", *FIXED, f"model.name={moved}"])
    assert refused.returncode != 0 and "privacy.public_model_dirs" in refused.stderr + refused.stdout
    assert not (tmp_path / "d" / "privacy_ledger.json").exists() or not ledger_of(tmp_path / "d")["phases"]
    ok(dpc(["train", CONFIG, f"run.output_dir={tmp_path}", "run.name=e", *FIXED, f"model.name={moved}",
            f"privacy.public_model_dirs=[{moved}]"]))
    declared = ledger_of(tmp_path / "e")["phases"][f"public:{moved.resolve()}"]
    assert declared["mechanisms"] == [] and declared["status"] == "completed"


@pytest.mark.timeout(600)
def test_one_process_per_phase_early_delta_check_and_checkpoints_before_eval_releases(tmp_path):
    import fcntl

    run = tmp_path / "l"
    run.mkdir()
    args = ["train", CONFIG, f"run.output_dir={tmp_path}", "run.name=l", *BASE, "train.max_steps=5",
            "wandb.mode=disabled", "privacy.randomness=secure", "privacy.noise_seed=null"]
    # another process holds the phase: refused before anything is reserved
    with open(run / ".train.lock", "a") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        busy = dpc(args)
    assert busy.returncode != 0 and "running in another process" in busy.stderr + busy.stdout
    assert not (run / "privacy_ledger.json").exists() or not ledger_of(run)["phases"]
    # delta >= 1/N: refused before head_init (which reads the data) and before any ledger exists
    bad = dpc([*args, "privacy.delta=0.01", "head_init.centre_pooler=true", "run.name=m"])
    assert bad.returncode != 0 and "privacy.delta" in bad.stderr + bad.stdout
    assert not (tmp_path / "m" / "privacy_ledger.json").exists() and not (tmp_path / "m" / "head_init.pt").exists()
    # eval_every releases the parameters of steps 2 and 4: each is checkpointed before it is logged,
    # so a resume (fresh key) never redraws a released step
    ok(dpc([*args, "train.eval_every=2", "run.name=n"]))
    run = tmp_path / "n"
    assert (run / "checkpoints" / "latest_complete").read_text().strip() == "step00000004"
    results = json.loads((run / "results.json").read_text())
    assert results["randomness"] == "secure" and results["epsilon"] == pytest.approx(
        compute_epsilon([Mechanism.from_dict(m) for e in ledger_of(run)["phases"].values() for m in e["mechanisms"]],
                        ledger_of(run)["delta"]), rel=1e-9)
