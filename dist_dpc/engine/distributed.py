"""Rank and world from whichever launcher started us (torchrun, deepspeed, SLURM srun), then init."""

from __future__ import annotations

import os
import socket
import subprocess
from dataclasses import dataclass


@dataclass(frozen=True)
class WorldInfo:
    rank: int
    local_rank: int
    world_size: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_from_slurm(environ: dict[str, str] | None = None) -> dict[str, str]:
    """torch.distributed variables derived from a SLURM task's environment (srun, one task per GPU).

    Master address: first host of the job's node list; port: derived from the job id so that two
    jobs sharing a node do not collide.
    """
    env = os.environ if environ is None else environ
    out = {
        "RANK": env["SLURM_PROCID"],
        "WORLD_SIZE": env["SLURM_NTASKS"],
        "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
    }
    if "MASTER_ADDR" not in env:
        out["MASTER_ADDR"] = first_host(env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or socket.gethostname())
    if "MASTER_PORT" not in env:
        out["MASTER_PORT"] = str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000)
    return out


def first_host(nodelist: str) -> str:
    """Address of the first node of a SLURM node list: its NodeAddr (what SLURM itself uses to
    reach it; differs from the name on clusters with a separate fabric and on emulated nodes)."""
    try:
        hosts = subprocess.run(["scontrol", "show", "hostnames", nodelist], check=True, capture_output=True, text=True).stdout.split()
        if hosts:
            info = subprocess.run(["scontrol", "show", "node", "-o", hosts[0]], capture_output=True, text=True).stdout
            for field in info.split():
                if field.startswith("NodeAddr=") and field[9:]:
                    return field[9:]
            return hosts[0]
    except (OSError, subprocess.CalledProcessError):
        pass
    # Fallback without scontrol: "node[1-3],other" -> "node1"
    head = nodelist.split(",")[0]
    if "[" in head:
        prefix, rng = head.split("[", 1)
        return prefix + rng.rstrip("]").split(",")[0].split("-")[0]
    return head


def world_from_env() -> WorldInfo:
    if "RANK" not in os.environ and "SLURM_PROCID" in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        os.environ.update(env_from_slurm())
    return WorldInfo(
        rank=int(os.environ.get("RANK", "0")),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        world_size=int(os.environ.get("WORLD_SIZE", "1")),
    )


def init_distributed(world: WorldInfo | None = None) -> WorldInfo:
    """Initialise torch.distributed through DeepSpeed (gloo on CPU, nccl on GPU); single process too."""
    import deepspeed
    import torch

    world = world or world_from_env()
    own_port = world.world_size == 1 and "MASTER_PORT" not in os.environ
    if world.world_size == 1:
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    if torch.cuda.is_available():
        torch.cuda.set_device(world.local_rank)
    attempts = 5 if own_port else 1
    for attempt in range(attempts):
        if torch.distributed.is_initialized():
            break
        try:
            deepspeed.init_distributed(dist_init_required=True, verbose=False)
        except RuntimeError as exc:
            # A port we picked can be taken by another process before the store listens on it (many
            # single-process jobs starting on one machine): pick another. A given MASTER_PORT is the
            # user's and fails as it is.
            if "EADDRINUSE" not in str(exc) or attempt == attempts - 1:
                raise
            os.environ["MASTER_PORT"] = str(_free_port())
    return world


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def collective_device() -> torch.device:
    """Where tensors handed to torch.distributed collectives must live: this rank's GPU under NCCL,
    else the CPU (gloo). (privacy.randomness.broadcast_key keeps its own line: privacy imports no engine.)"""
    import torch

    if torch.distributed.is_initialized() and torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
