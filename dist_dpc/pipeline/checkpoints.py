"""Resumable checkpoints of a phase: DeepSpeed state + DP engine state (accountant, seeds, step).

A checkpoint is written under a new tag and only then named in ``latest`` (atomic rename), and
older tags are deleted after that: a kill at any moment leaves the previous checkpoint loadable.
Checkpoints hold model and optimizer state trained on the private data: the directory is made
0700 before DeepSpeed writes into it, and everything DeepSpeed wrote is made 0600 after each save
(DeepSpeed takes no file mode).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from dist_dpc.utils.atomic import PRIVATE_FILE, atomic_write, make_private_tree, private_dir


class Checkpoints:
    def __init__(self, directory: Path, keep: int, world):
        self.directory, self.keep, self.world = Path(directory), max(1, keep), world

    def latest(self) -> str | None:
        pointer = self.directory / "latest_complete"
        if not pointer.is_file():
            return None
        tag = pointer.read_text().strip()
        return tag if (self.directory / tag).is_dir() else None

    def save(self, engine, client_state: dict | None = None) -> str:
        tag = f"step{engine.steps_done:08d}"
        private_dir(self.directory)  # every rank: each may be the first to write (node-local disks)
        engine.save_checkpoint(self.directory, tag, client_state)
        make_private_tree(self.directory)  # before any other rank's cleanup can start (barrier below)
        torch.distributed.barrier()  # every rank's shard is on disk before the pointer moves
        if self.world.is_main:
            atomic_write(self.directory / "latest_complete", lambda tmp: tmp.write_text(tag), mode=PRIVATE_FILE)
            tags = sorted(p.name for p in self.directory.glob("step*") if p.is_dir())
            for old in tags[:-self.keep]:
                shutil.rmtree(self.directory / old, ignore_errors=True)
        torch.distributed.barrier()
        return tag

    def load(self, engine) -> dict:
        tag = self.latest()
        if tag is None:
            raise FileNotFoundError(f"no complete checkpoint in {self.directory}")
        return engine.load_checkpoint(self.directory, tag)
