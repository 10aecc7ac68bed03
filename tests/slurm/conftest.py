"""A real SLURM cluster (2 emulated nodes) started by the project's own slurm/local_cluster.sh.

The cluster gets its own state dir and ports (not the defaults of a user's `slurm/local_cluster.sh
start`), is started once per session and stopped at the end only if this session started it.
DPC_SKIP_SLURM=1 skips the SLURM tests; any other failure to start fails them with the log tail.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "slurm" / "local_cluster.sh"
STATE = Path(os.environ.get("DPC_TEST_SLURM_DIR", "/tmp/dpc-slurm-tests"))
NODES = ["node1", "node2"]
# Clear of local_cluster.sh's defaults (6817.., 3307) so a user's cluster can run beside the tests.
PORTS = {"SLURM_PORT_BASE": "6917", "SLURM_MYSQL_PORT": "3407"}


def _log_tail(proc_out: str, lines: int = 60) -> str:
    parts = ["\n".join(proc_out.splitlines()[-lines:])]
    for name in ("apt.log", "mysqld.err", "slurmdbd.log", "slurmctld.log", "slurmd-node1.log"):
        path = STATE / "log" / name
        if path.is_file():
            tail = path.read_text(errors="replace").splitlines()[-15:]
            parts.append(f"--- {path} (last lines)\n" + "\n".join(tail))
    return "\n".join(parts)


@pytest.fixture(scope="session")
def slurm_cluster():
    if os.environ.get("DPC_SKIP_SLURM") == "1":
        pytest.skip("DPC_SKIP_SLURM=1: SLURM cluster tests skipped on request")
    env = dict(os.environ)
    env.update(DPC_SLURM_DIR=str(STATE), SLURM_NODES=str(len(NODES)), **PORTS)
    status = subprocess.run(["bash", str(SCRIPT), "status"], env=env, capture_output=True, text=True, timeout=60)
    was_running = status.returncode == 0
    # Always run start: idempotent (0.5 s when up) and it repairs a partly running cluster.
    stop = ["bash", str(SCRIPT), "stop"]
    try:
        proc = subprocess.run(["bash", str(SCRIPT), "start"], env=env, capture_output=True, text=True, timeout=900)
        failure = None if proc.returncode == 0 else f"failed (rc {proc.returncode})"
        out = proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as e:
        failure = f"timed out after {e.timeout} s"
        out = "".join(x.decode(errors="replace") if isinstance(x, bytes) else (x or "") for x in (e.stdout, e.stderr))
    if failure:
        message = (f"slurm/local_cluster.sh start {failure}; set DPC_SKIP_SLURM=1 to skip the SLURM tests on "
                   f"purpose.\n{_log_tail(out)}")
        if not was_running:  # do not leave half a cluster behind
            subprocess.run(stop, env=env, capture_output=True, timeout=180)
        pytest.fail(message, pytrace=False)
    conf = str(STATE / "etc" / "slurm.conf")
    assert f"export SLURM_CONF={conf}" in proc.stdout, proc.stdout
    previous = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = conf
    env["SLURM_CONF"] = conf
    try:
        yield {"conf": conf, "nodes": list(NODES), "dir": str(STATE), "partition": "debug", "env": env}
    finally:
        if previous is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = previous
        if not was_running:  # stop only what this session started
            subprocess.run(stop, env=env, capture_output=True, timeout=180)
