"""dist-dpc on a real SLURM cluster: 2-node DP job, afterok chains, cancellation, requeue and resume."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import submitit

from dist_dpc.pipeline.config import load_config
from launch.submit import executor_for, status, submit

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(900)]
ROOT = Path(__file__).resolve().parents[2]
COMMON = ["model.name=tiny-bert", "model.dropout=0", "data.synthetic_size=200", "data.max_length=16",
          "train.batch_size=20", "train.micro_batch_size=8", "train.lr=5e-3",
          "privacy.randomness=insecure_reproducible", "privacy.noise_seed=7",
          "cluster.executor=slurm", "cluster.cpus_per_task=1", "cluster.time_min=10"]


def config(tmp_path, name, *extra):
    return load_config(str(ROOT / "configs" / "debug.yaml"), [f"run.output_dir={tmp_path}", f"run.name={name}", *COMMON, *extra])


def wait_done(run_dir: Path, timeout: float = 400) -> list[dict]:
    deadline = time.time() + timeout
    while time.time() < deadline:
        rows = status(run_dir)
        if all(r["state"] in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL") for r in rows):
            return rows
        time.sleep(1)
    raise AssertionError(f"jobs of {run_dir} did not finish: {status(run_dir)}")


def sacct_times(job_id: str) -> tuple[str, str]:
    out = subprocess.run(["sacct", "-n", "-P", "-X", "-j", job_id, "-o", "Start,End"], capture_output=True, text=True).stdout
    start, end = out.strip().splitlines()[0].split("|")
    return start, end


def test_two_node_dp_job_equals_single_process(slurm_cluster, tmp_path):
    from safetensors.torch import load_file

    noiseless = ["privacy.target_epsilon=null", "privacy.noise_multiplier=0", "train.max_steps=5"]
    two = config(tmp_path, "two-nodes", "cluster.nodes=2", *noiseless)
    (row,) = submit(two, phases=("train",))
    rows = wait_done(tmp_path / "two-nodes")
    assert rows[0]["state"] == "COMPLETED", Path(row["logs"]).joinpath(f"{row['job_id']}_0_log.err").read_text()[-3000:]
    log = (Path(row["logs"]) / f"{row['job_id']}_0_log.out").read_text()
    assert "world=2" in log
    # Both tasks really ran on different (emulated) nodes.
    nodes = subprocess.run(["sacct", "-n", "-P", "-j", row["job_id"], "-o", "NodeList"], capture_output=True, text=True).stdout
    assert "node[1-2]" in nodes
    single = subprocess.run([sys.executable, "-m", "dist_dpc.cli", "train", str(ROOT / "configs" / "debug.yaml"),
                             f"run.output_dir={tmp_path}", "run.name=one-process", *COMMON, *noiseless],
                            capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert single.returncode == 0, single.stderr[-3000:]
    a = load_file(tmp_path / "two-nodes" / "model" / "model.safetensors")
    b = load_file(tmp_path / "one-process" / "model" / "model.safetensors")
    # Same logical batches, same clipping; only the order of float32 sums differs across ranks.
    assert all(float((a[k] - b[k]).abs().max()) < 1e-4 for k in a)


def slow_task(path: str, seconds: float) -> str:
    Path(path).write_text(str(time.time()))
    time.sleep(seconds)
    return path


def test_afterok_chain_and_cancelled_dependency(slurm_cluster, tmp_path):
    cfg = config(tmp_path, "chain")
    first = executor_for(cfg, tmp_path / "jobs", "first").submit(slow_task, str(tmp_path / "a"), 4)
    second = executor_for(cfg, tmp_path / "jobs", "second", after=first.job_id).submit(slow_task, str(tmp_path / "b"), 0)
    assert second.result() == str(tmp_path / "b")
    assert float((tmp_path / "b").read_text()) >= float((tmp_path / "a").read_text()) + 4
    assert sacct_times(second.job_id)[0] >= sacct_times(first.job_id)[1]
    # A cancelled phase is reported as such, promptly, and its dependant never runs.
    doomed = executor_for(cfg, tmp_path / "jobs", "doomed").submit(slow_task, str(tmp_path / "c"), 120)
    dependant = executor_for(cfg, tmp_path / "jobs", "dependant", after=doomed.job_id).submit(slow_task, str(tmp_path / "d"), 0)
    while doomed.state not in ("RUNNING",):
        time.sleep(0.5)
    doomed.cancel()
    start = time.time()
    with pytest.raises(submitit.core.utils.UncompletedJobError):
        doomed.result()
    assert time.time() - start < 90
    deadline = time.time() + 60
    while dependant.state in ("PENDING", "UNKNOWN") and time.time() < deadline:
        time.sleep(1)
    assert dependant.state in ("CANCELLED", "FAILED") or dependant.state.startswith("CANCELLED")
    assert not (tmp_path / "d").exists()


@pytest.mark.slow  # ~3 min: `make test-slow` (make test keeps the two-node job and the kill -9 resume test)
def test_requeued_job_resumes_with_identical_ledger(slurm_cluster, tmp_path):
    extra = ["train.max_steps=40", "train.checkpoint_every=5", "privacy.target_epsilon=4"]
    straight = subprocess.run([sys.executable, "-m", "dist_dpc.cli", "train", str(ROOT / "configs" / "debug.yaml"),
                               f"run.output_dir={tmp_path}", "run.name=straight", *COMMON, *extra],
                              capture_output=True, text=True, timeout=400, cwd=ROOT)
    assert straight.returncode == 0, straight.stderr[-3000:]
    (row,) = submit(config(tmp_path, "requeued", *extra), phases=("train",))
    run = tmp_path / "requeued"
    pointer = run / "checkpoints" / "latest_complete"
    deadline = time.time() + 300
    while time.time() < deadline and not (pointer.is_file() and pointer.read_text().strip() >= "step00000010"):
        time.sleep(0.3)
    assert not (run / "results.json").exists(), "finished before the requeue"
    subprocess.run(["scontrol", "requeue", row["job_id"]], check=True)
    rows = wait_done(run, timeout=500)
    assert rows[0]["state"] == "COMPLETED"
    log = (Path(row["logs"]) / f"{row['job_id']}_0_log.out").read_text()
    assert "resumed from step" in log
    a = json.loads((tmp_path / "straight" / "results.json").read_text())
    b = json.loads((run / "results.json").read_text())
    assert a["epsilon"] == b["epsilon"] and a["steps"] == b["steps"] and a["metrics"] == b["metrics"]
    attempts = list((run / "wandb").glob("offline-run-*"))
    run_id = (run / "wandb_run_id").read_text().strip()
    assert len(attempts) == 2 and all(p.name.endswith(run_id) for p in attempts)


def test_generate_runs_as_an_array_after_the_teacher(slurm_cluster, tmp_path):
    """`dpc submit` of [teacher, generate] with generate.shards=2: the teacher, then an array of two
    tasks (afterok on the teacher); each writes its shard's batches, the last merges them."""
    cfg = load_config(str(ROOT / "configs" / "debug_lm.yaml"),
                      [f"run.output_dir={tmp_path}", "run.name=gen", "train.max_steps=2", "data.synthetic_size=120",
                       "cluster.executor=slurm", "cluster.cpus_per_task=1", "cluster.time_min=10",
                       "pipeline.phases=[teacher, generate]", "generate.shards=2", "generate.batch_size=2",
                       "generate.max_new_tokens=6", "generate.prompts={'': 7}"])
    records = submit(cfg)
    assert [r["phase"] for r in records] == ["teacher", "generate[0]", "generate[1]"]
    rows = wait_done(tmp_path / "gen")
    assert all(r["state"] == "COMPLETED" for r in rows), rows
    samples = [json.loads(x) for x in (tmp_path / "gen" / "generate" / "samples.jsonl").read_text().splitlines()]
    assert [s["id"] for s in samples] == list(range(7))
    logs = "".join(p.read_text() for p in (tmp_path / "gen" / "jobs").glob("*_log.out"))
    assert "shard(s) [0] of 2" in logs and "shard(s) [1] of 2" in logs
