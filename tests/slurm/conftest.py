"""A real SLURM cluster (2 emulated nodes) started by the project's own slurm/local_cluster.sh."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "slurm" / "local_cluster.sh"
STATE = Path(os.environ.get("DPC_TEST_SLURM_DIR", "/tmp/dpc-slurm-tests"))


@pytest.fixture(scope="session")
def slurm_cluster():
    if os.environ.get("DPC_SKIP_SLURM") == "1":
        pytest.skip("DPC_SKIP_SLURM=1: SLURM cluster tests skipped on request")
    env = dict(os.environ, DPC_SLURM_DIR=str(STATE), SLURM_NODES="2", SLURM_PORT_BASE="6917", SLURM_MYSQL_PORT="3407")
    running = subprocess.run(["bash", str(SCRIPT), "status"], env=env, capture_output=True, text=True).returncode == 0
    if not running:
        proc = subprocess.run(["bash", str(SCRIPT), "start"], env=env, capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            pytest.fail(f"slurm/local_cluster.sh start failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    os.environ["SLURM_CONF"] = str(STATE / "etc" / "slurm.conf")
    yield {"conf": os.environ["SLURM_CONF"], "nodes": ["node1", "node2"], "env": env}
    if not running:  # stop only what this session started
        subprocess.run(["bash", str(SCRIPT), "stop"], env=env, capture_output=True, timeout=120)
