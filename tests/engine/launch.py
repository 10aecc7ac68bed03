"""Start real ranks with torchrun (gloo on CPU) under a hard timeout."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


def torchrun(script: str, args: list[str], world_size: int, timeout: int = 600) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK",
                                                              "WANDB_SERVICE")}
    env = dict(base, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world_size),
           "--master_port", str(_free_port()), str(ROOT / script), *args]
    # A hung gloo job spins forever: the timeout kills the whole process group.
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        out, _ = proc.communicate()
        raise AssertionError(f"{script} timed out after {timeout}s:\n{out[-4000:]}")
    if proc.returncode != 0:
        raise AssertionError(f"{script} failed ({proc.returncode}):\n{out[-6000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, "")


def run_worker(spec: dict, world_size: int, tmp_path: Path, timeout: int = 600) -> dict:
    spec_file, out_file = tmp_path / f"spec{world_size}.json", tmp_path / f"out{world_size}.pt"
    spec_file.write_text(json.dumps(spec))
    torchrun("tests/engine/dp_worker.py", [str(spec_file), str(out_file)], world_size, timeout)
    return torch.load(out_file, weights_only=False)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
