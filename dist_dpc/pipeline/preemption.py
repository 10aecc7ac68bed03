"""Save a checkpoint when the scheduler says the job must stop (preemption, time limit, requeue).

SLURM sends SIGTERM before killing a job (scancel, scontrol requeue, preemption) and, when asked
(`--signal`, which submitit sets), SIGUSR1/SIGUSR2 ahead of the time limit. The handler only sets a
flag; the training loop looks at it between steps, where the DeepSpeed state is consistent, all
ranks agree on it (one 1-element all-reduce per step when there are several), a checkpoint is
saved atomically, and then the job stops: through submitit's own handler when there was one (it
requeues the job), otherwise with an exit message. The requeued job resumes from that checkpoint.
"""

from __future__ import annotations

import signal
import sys
import threading
import time

import torch

SIGNALS = tuple(s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGUSR1", None),
                            getattr(signal, "SIGUSR2", None)) if s is not None)


class Preempted(SystemExit):
    """Raised after the preemption checkpoint is on disk; the process should end."""


class PreemptionGuard:
    def __init__(self, world, device):
        self.world, self.device = world, device
        self.signum: int | None = None
        self.previous: dict[int, object] = {}
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self.previous[sig] = signal.signal(sig, self._note)

    def _note(self, signum, frame) -> None:
        self.signum = signum

    def requested(self) -> bool:
        local = self.signum is not None
        if self.world.world_size == 1:
            return local
        # Ranks may see the signal on either side of a step boundary: agree before saving together.
        flag = torch.tensor([1.0 if local else 0.0], device=self.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        if flag.item() > 0 and self.signum is None:
            self.signum = int(signal.SIGTERM)
        return flag.item() > 0

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}

    def stop(self, where: str) -> None:
        """Called once the checkpoint is saved on every rank: hand over to the scheduler's handler."""
        signum, previous = self.signum, dict(self.previous)
        self.restore()
        name = signal.Signals(signum).name
        handler = previous.get(signum)
        if callable(handler):
            handler(signum, None)  # submitit: rank 0 requeues the job and exits; other ranks return
            if self.world.rank != 0:
                time.sleep(120)  # let rank 0 requeue; the requeue ends this task
        print(f"{name} received: checkpoint saved at {where}; run the same command again to resume", file=sys.stderr,
              flush=True)
        raise Preempted(143 if signum == signal.SIGTERM else 1)
