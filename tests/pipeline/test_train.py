"""`dpc train` end to end on a debug model: single process, two torchrun ranks, kill and resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BASE = ["model.name=tiny-bert", "data.synthetic_size=200", "data.max_length=16", "train.batch_size=20",
        "train.micro_batch_size=8", "train.lr=5e-3", "privacy.target_epsilon=4",
        "privacy.randomness=insecure_reproducible", "privacy.noise_seed=7"]


# WANDB_SERVICE: an in-process test that used W&B leaves the address of its W&B service in os.environ;
# a child inheriting it would register its run in that service, and a child killed with -9 would
# leave its run id "in use" there for the child that resumes it.
DIST_VARS = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "WANDB_SERVICE")


def env():
    # In-process tests initialise torch.distributed and leave MASTER_PORT set: a child must not inherit it.
    base = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    return dict(base, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT),
                TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions")))


def dpc(args, timeout=300, **kw):
    return subprocess.run([sys.executable, "-m", "dist_dpc.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env(), cwd=ROOT, **kw)


@pytest.mark.timeout(600)
def test_train_single_process_then_refuses_to_clobber(tmp_path):
    args = ["train", str(ROOT / "configs" / "debug.yaml"), f"run.output_dir={tmp_path}", "run.name=one", *BASE,
            "train.max_steps=6"]
    proc = dpc(args)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run = tmp_path / "one"
    results = json.loads((run / "results.json").read_text())
    assert results["private"] and results["steps"] == 6 and 0 < results["epsilon"] <= 4.0
    assert results["noise_multiplier"] > 0 and results["delta"] < 1 / 200
    assert "validation: accuracy" in proc.stdout and "epsilon=" in proc.stdout and "sigma=" in proc.stdout
    assert (run / "config.yaml").is_file() and (run / "model" / "config.json").is_file()
    saved = (run / "results.json").read_text()
    again = dpc(args)
    assert again.returncode == 2 and "already holds a finished run" in again.stderr
    assert (run / "results.json").read_text() == saved  # nothing overwritten
    other = dpc(args[:-1] + ["train.max_steps=7", "run.overwrite=false"])
    assert other.returncode == 2


@pytest.mark.timeout(600)
def test_killed_run_resumes_to_the_same_result(tmp_path):
    # A linear schedule with warm-up: the resumed run must pick the schedule up at the right step.
    common = ["train", str(ROOT / "configs" / "debug.yaml"), f"run.output_dir={tmp_path}", *BASE, "train.max_steps=10",
              "train.checkpoint_every=2", "train.log_every=1", "train.lr_schedule=linear", "train.warmup_steps=2"]
    straight = dpc(common + ["run.name=straight"])
    assert straight.returncode == 0, straight.stderr[-3000:]
    # Start, wait for a complete checkpoint past step 2, kill -9 (a preemption without warning), resume.
    run = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "dist_dpc.cli", *common, "run.name=killed"], env=env(), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    pointer = run / "checkpoints" / "latest_complete"
    deadline = time.time() + 240
    while time.time() < deadline and not (pointer.is_file() and pointer.read_text().strip() >= "step00000004"):
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (run / "results.json").exists(), "the run finished before it could be killed"
    resumed = dpc(common + ["run.name=killed"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from step" in resumed.stdout
    a = json.loads((tmp_path / "straight" / "results.json").read_text())
    b = json.loads((run / "results.json").read_text())
    assert a["epsilon"] == b["epsilon"] and a["metrics"] == b["metrics"]
    from safetensors.torch import load_file

    wa, wb = load_file(tmp_path / "straight" / "model" / "model.safetensors"), load_file(run / "model" / "model.safetensors")
    assert all((wa[k] == wb[k]).all() for k in wa)
    # The lr each step ran at (logged after the step), against the hand-computed schedule: 5e-3 x
    # [1/3, 2/3] warm-up, then (10 - s) / 8.
    lrs = [json.loads(line)["train/lr"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    expected = [5e-3 * f for f in (1 / 3, 2 / 3, 1, 7 / 8, 6 / 8, 5 / 8, 4 / 8, 3 / 8, 2 / 8, 1 / 8)]
    assert lrs == pytest.approx(expected, rel=1e-6)
    # Both attempts wrote into the same W&B run (the resumed phase continues its run id).
    run_id = (run / "wandb_run_id").read_text().strip()
    attempts = list((run / "wandb").glob("offline-run-*"))
    assert len(attempts) == 2 and all(p.name.endswith(run_id) for p in attempts)


@pytest.mark.timeout(300)
def test_two_lr_schedulers_are_refused(tmp_path):
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 5}}}))
    proc = dpc(["train", str(ROOT / "configs" / "debug.yaml"), f"run.output_dir={tmp_path}", "run.name=two", *BASE,
                "train.max_steps=2", "train.lr_schedule=linear", f"train.deepspeed_config={ds}"])
    assert proc.returncode != 0
    assert "has a scheduler block" in proc.stderr and "train.lr_schedule='linear'" in proc.stderr
    assert not (tmp_path / "two" / "model").exists()


@pytest.mark.timeout(600)
def test_torchrun_two_ranks_zero2(tmp_path):
    from tests.engine.launch import torchrun

    out = torchrun("dist_dpc/train.py", [str(ROOT / "configs" / "debug.yaml"), f"run.output_dir={tmp_path}", "run.name=two",
                                         *BASE, "train.max_steps=4", "train.zero_stage=2"], world_size=2, timeout=500)
    results = json.loads((tmp_path / "two" / "results.json").read_text())
    assert results["steps"] == 4 and results["epsilon"] > 0
    assert "world=2" in out.stdout and "zero_stage=2" in out.stdout


@pytest.mark.slow  # with the SLURM requeue test: `make test-slow` (the kill -9 resume test stays in make test)
@pytest.mark.timeout(600)
def test_sigterm_saves_a_checkpoint_and_the_resumed_run_matches(tmp_path):
    """A scheduler's warning (SIGTERM on scancel/requeue/preemption): the step in flight finishes, a
    checkpoint is saved although none was scheduled, the process ends; resuming gives the same run."""
    common = ["train", str(ROOT / "configs" / "debug.yaml"), f"run.output_dir={tmp_path}", *BASE, "train.max_steps=40",
              "train.checkpoint_every=0", "train.log_every=1"]
    straight = dpc(common + ["run.name=straight"])
    assert straight.returncode == 0, straight.stderr[-3000:]
    a = json.loads((tmp_path / "straight" / "results.json").read_text())
    run = tmp_path / "stopped"
    proc = subprocess.Popen([sys.executable, "-m", "dist_dpc.cli", *common, "run.name=stopped"], env=env(), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 3):
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 143, err[-3000:]
    assert "SIGTERM received: checkpoint saved" in err
    assert not (run / "results.json").exists()
    tag = (run / "checkpoints" / "latest_complete").read_text().strip()
    assert "step00000003" <= tag < f"step{a['steps']:08d}"
    resumed = dpc(common + ["run.name=stopped"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {tag}" in resumed.stdout
    b = json.loads((run / "results.json").read_text())
    assert a["epsilon"] == b["epsilon"] and a["metrics"] == b["metrics"]
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps == list(range(1, a["steps"] + 1))  # metrics of the replayed steps are not duplicated


def test_data_too_small_for_the_budget_or_batch_is_refused_before_training(tmp_path):
    from dist_dpc.pipeline.config import load_config
    from dist_dpc.pipeline.trainer import run_train

    base = [f"run.output_dir={tmp_path}", *BASE]
    # 200 examples at batch 20 over 30 steps, epsilon 0.2: sigma/B far above the 0.1 limit.
    with pytest.raises(ValueError, match="too small for this privacy budget.*smallest epsilon"):
        run_train(load_config(str(ROOT / "configs" / "debug.yaml"),
                              [*base, "run.name=small", "privacy.target_epsilon=0.2", "train.max_steps=30"]))
    ledger = tmp_path / "small" / "privacy_ledger.json"
    assert not ledger.exists() or json.loads(ledger.read_text())["phases"] == {}  # nothing reserved
    with pytest.raises(ValueError, match="train.batch_size=500 is not below the 200 training examples"):
        run_train(load_config(str(ROOT / "configs" / "debug.yaml"), [*base, "run.name=batch", "train.batch_size=500"]))


def test_a_trained_head_of_another_size_is_refused(tmp_path):
    from dist_dpc.models import ModelConfig, load_sequence_classifier, load_tokenizer

    tokenizer = load_tokenizer(ModelConfig(name="tiny-bert"))
    model = load_sequence_classifier(ModelConfig(name="tiny-bert"), 2, tokenizer)
    model.save_pretrained(tmp_path / "two")
    assert load_sequence_classifier(ModelConfig(name=str(tmp_path / "two")), 2, tokenizer).config.num_labels == 2
    with pytest.raises(ValueError, match="trained classifier head of 2 classes, the task 5"):
        load_sequence_classifier(ModelConfig(name=str(tmp_path / "two")), 5, tokenizer)


@pytest.mark.timeout(600)
def test_with_a_holdout_only_public_sizes_are_released(tmp_path):
    """data.holdout_fraction splits by a keyed hash: the training part's realised size depends on the
    data. Released numbers (dataset_size, delta, per-step epsilon) use N and the public stand-in."""
    args = ["train", str(ROOT / "configs" / "debug.yaml"), f"run.output_dir={tmp_path}", "run.name=h", *BASE,
            "train.max_steps=2", "data.holdout_fraction=0.2", "train.log_every=1"]
    proc = dpc(args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "h" / "results.json").read_text())
    ledger = json.loads((tmp_path / "h" / "privacy_ledger.json").read_text())
    n = ledger["dataset_size"]
    assert results["dataset_size"] == n - round(0.2 * n)  # the public stand-in
    assert results["delta"] == ledger["delta"] == pytest.approx(1 / n ** 1.1)
    logged = [json.loads(x) for x in (tmp_path / "h" / "metrics.jsonl").read_text().splitlines()]
    assert logged[-1]["privacy/epsilon"] == pytest.approx(results["epsilon"], rel=1e-6)
