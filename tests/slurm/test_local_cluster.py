"""The local SLURM cluster of slurm/local_cluster.sh: nodes, srun placement, submitit results,
cancellation and afterok dependencies, and the plain sbatch template slurm/dpc_phase.sbatch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import submitit
from submitit.core.utils import FailedJobError, UncompletedJobError

pytestmark = pytest.mark.slurm
ROOT = Path(__file__).resolve().parents[2]


def sh(*cmd: str, timeout: float = 60, **kwargs) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kwargs)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def executor(folder: Path, **params) -> submitit.AutoExecutor:
    ex = submitit.AutoExecutor(folder=str(folder), cluster="slurm")
    ex.update_parameters(**{"slurm_partition": "debug", "timeout_min": 5, "cpus_per_task": 1, "nodes": 1,
                            "tasks_per_node": 1, **params})
    return ex


def squeue_field(job_id: str, field: str) -> str:
    return sh("squeue", "-h", "-j", str(job_id), "-o", field).strip()


def sacct_times(job_id: str, timeout: float = 20) -> tuple[str, str]:
    """Start and End of a finished job from accounting (ISO timestamps, 1 s resolution)."""
    deadline = time.time() + timeout
    while True:
        out = sh("sacct", "-n", "-P", "-X", "-j", str(job_id), "-o", "Start,End").strip()
        if out and "Unknown" not in out:
            start, end = out.splitlines()[0].split("|")
            return start, end
        assert time.time() < deadline, f"sacct has no Start/End for job {job_id}: {out!r}"
        time.sleep(0.5)


# ---- job bodies (module level: pickled by reference, imported by the job from the repo root)

def task_identity() -> tuple[int, str]:
    return int(os.environ["SLURM_PROCID"]), os.environ["SLURMD_NODENAME"]


def sleeper(seconds: float) -> str:
    time.sleep(seconds)
    return "woke up"


def stamp(path: str, seconds: float) -> tuple[float, float]:
    start = time.time()
    time.sleep(seconds)
    end = time.time()
    Path(path).write_text(json.dumps({"job": os.environ["SLURM_JOB_ID"], "start": start, "end": end}))
    return start, end


# ---- tests

@pytest.mark.timeout(60)
def test_both_nodes_idle(slurm_cluster):
    deadline = time.time() + 30  # jobs of an earlier test module may still be completing
    while True:
        out = sh("sinfo", "-h", "-N", "-p", "debug", "-o", "%N %t")
        states = dict(line.split() for line in out.splitlines())
        if states == {n: "idle" for n in slurm_cluster["nodes"]} or time.time() > deadline:
            break
        time.sleep(0.5)
    assert states == {"node1": "idle", "node2": "idle"}
    assert sh("sinfo", "-h", "-o", "%P").split() == ["debug*"]


@pytest.mark.timeout(60)
def test_srun_puts_one_task_on_each_node(slurm_cluster):
    out = sh("srun", "-N2", "-n2", "-p", "debug", "--time=1", "bash", "-c",
             'echo "$SLURM_PROCID $SLURMD_NODENAME $(hostname)"', timeout=50)
    rows = sorted(line.split() for line in out.splitlines())
    assert [r[0] for r in rows] == ["0", "1"]
    assert {r[1] for r in rows} == {"node1", "node2"}  # emulated nodes differ...
    assert rows[0][2] == rows[1][2]                    # ...on the one real host


@pytest.mark.timeout(90)
def test_submitit_two_node_job_returns_every_task(slurm_cluster, tmp_path):
    job = executor(tmp_path, nodes=2, tasks_per_node=1).submit(task_identity)
    results = job.results()
    assert sorted(rank for rank, _ in results) == [0, 1]
    assert {node for _, node in results} == {"node1", "node2"}  # one task on each node
    # accounting (what submitit polls) may lag the job by a few seconds, never forever
    deadline = time.time() + 30
    while (state := job.watcher.get_state(job.job_id, mode="force")) != "COMPLETED" and time.time() < deadline:
        time.sleep(0.5)
    assert state == "COMPLETED"


@pytest.mark.timeout(120)
def test_cancelled_job_raises_instead_of_hanging(slurm_cluster, tmp_path):
    job = executor(tmp_path).submit(sleeper, 300)
    deadline = time.time() + 30
    while squeue_field(job.job_id, "%T") != "RUNNING":
        assert time.time() < deadline, f"job {job.job_id} never started: {squeue_field(job.job_id, '%T %r')}"
        time.sleep(0.2)
    job.cancel()
    start = time.time()
    with pytest.raises((UncompletedJobError, FailedJobError)) as info:
        job.result()
    elapsed = time.time() - start
    assert elapsed < 60, f"took {elapsed:.0f} s to notice the cancellation"
    assert "CANCELLED" in str(info.value)
    assert job.state.startswith("CANCELLED")
    assert sh("sacct", "-n", "-P", "-X", "-j", job.job_id, "-o", "State").startswith("CANCELLED")


@pytest.mark.timeout(120)
def test_afterok_dependency_waits_for_the_first_job(slurm_cluster, tmp_path):
    first = executor(tmp_path / "a").submit(stamp, str(tmp_path / "a.json"), 4)
    second = executor(tmp_path / "b", slurm_additional_parameters={"dependency": f"afterok:{first.job_id}"}) \
        .submit(stamp, str(tmp_path / "b.json"), 0)
    # While the first job runs (4 s), the second one is held back by its dependency.
    assert squeue_field(second.job_id, "%T %r") == "PENDING Dependency"
    a_start, a_end = first.result()
    b_start, _ = second.result()
    assert b_start >= a_end
    assert json.loads((tmp_path / "b.json").read_text())["start"] >= json.loads((tmp_path / "a.json").read_text())["end"]
    # The scheduler's own record agrees (ISO timestamps compare as strings).
    assert sacct_times(second.job_id)[0] >= sacct_times(first.job_id)[1]


FAKE_TRAIN = '''
import json, os, sys
keys = ["SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURMD_NODENAME", "SLURM_JOB_ID", "SLURM_CPUS_PER_TASK",
        "MASTER_ADDR", "MASTER_PORT", "OMP_NUM_THREADS"]
record = {k: os.environ.get(k) for k in keys}
record["argv"] = sys.argv[1:]
out = os.environ["DPC_FAKE_OUT"]
os.makedirs(out, exist_ok=True)
with open(os.path.join(out, "rank%s.json" % os.environ["SLURM_PROCID"]), "w") as f:
    json.dump(record, f)
'''


def run_template(tmp_path: Path, name: str, sbatch_opts: list[str], args: list[str], **env_extra) -> tuple[str, list[dict], str]:
    """sbatch slurm/dpc_phase.sbatch with a stand-in dist_dpc.train that records what each task saw."""
    fake = tmp_path / "fake" / "dist_dpc"
    fake.mkdir(parents=True, exist_ok=True)
    (fake / "__init__.py").write_text("")
    (fake / "train.py").write_text(FAKE_TRAIN)
    out = tmp_path / name
    env = {k: v for k, v in os.environ.items() if k not in ("CONFIG", "PHASE")}
    env.update(PYTHONPATH=str(tmp_path / "fake"), PYTHON=sys.executable, DPC_FAKE_OUT=str(out), **env_extra)
    job_id = sh("sbatch", "--wait", "--parsable", "--mem=100M", "--time=2", f"--output={tmp_path}/{name}-%j.out",
                *sbatch_opts, str(ROOT / "slurm" / "dpc_phase.sbatch"), *args, env=env, cwd=tmp_path, timeout=60).strip()
    log = next(tmp_path.glob(f"{name}-*.out")).read_text()
    records = [json.loads(p.read_text()) for p in sorted(out.glob("rank*.json"))] if out.is_dir() else []
    return job_id, records, log


@pytest.mark.timeout(90)
def test_sbatch_template_sets_up_every_task(slurm_cluster, tmp_path):
    cpus = min(2, min(int(c) for c in sh("sinfo", "-h", "-N", "-o", "%c").split()))
    (tmp_path / "cfg.yaml").write_text("run: {name: t}\n")
    # Two nodes, one task each: config as first argument, phase and an override passed through.
    job_id, records, log = run_template(tmp_path, "two", ["--nodes=2", "--ntasks-per-node=1", f"--cpus-per-task={cpus}"],
                                        ["cfg.yaml", "--phase", "train", "train.max_steps=3"])
    assert len(records) == 2, log
    port = str(20000 + int(job_id) % 20000)
    for rank, r in enumerate(records):
        assert (r["SLURM_PROCID"], r["SLURM_NTASKS"], r["SLURM_LOCALID"]) == (str(rank), "2", "0")
        assert r["argv"] == ["cfg.yaml", "--phase", "train", "train.max_steps=3"]
        assert r["MASTER_PORT"] == port and r["SLURM_JOB_ID"] == job_id
        assert r["MASTER_ADDR"] == "127.0.0.1"  # node1's NodeAddr: the node names do not resolve
        assert r["OMP_NUM_THREADS"] == str(cpus) and r["SLURM_CPUS_PER_TASK"] == str(cpus)
    assert {r["SLURMD_NODENAME"] for r in records} == {"node1", "node2"}
    # One node, two tasks: config and phase from the environment.
    job_id, records, log = run_template(tmp_path, "one", ["--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1"],
                                        ["x=1"], CONFIG="cfg.yaml", PHASE="dpkd")
    assert len(records) == 2, log
    assert [r["SLURM_LOCALID"] for r in records] == ["0", "1"]
    assert len({r["SLURMD_NODENAME"] for r in records}) == 1
    assert all(r["argv"] == ["cfg.yaml", "x=1", "--phase", "dpkd"] and r["OMP_NUM_THREADS"] == "1" for r in records)
