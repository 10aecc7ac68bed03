"""Resumable checkpoints of a phase: DeepSpeed state + DP engine state (accountant, seeds, step).

A checkpoint is written under a new tag and only then named in ``latest`` (atomic rename), and
older tags are deleted after that: a kill at any moment leaves the previous checkpoint loadable.
Checkpoints hold model and optimizer state trained on the private data: the directory is made
0700 before DeepSpeed writes into it, and everything DeepSpeed wrote is made 0600 after each save
(DeepSpeed takes no file mode).

At ZeRO >= 1 a DeepSpeed checkpoint holds one optimizer shard per rank and loads only at the world
size it was written at. Each tag records its world size and ZeRO stage (``layout.json``); a resume
at another world size converts the tag once with DeepSpeed's own converter
(``python -m deepspeed.checkpoint.ds_to_universal``) into ``TAG-universal`` and loads that with
DeepSpeed's ``checkpoint.load_universal`` (weights and optimizer state re-partitioned for the new
world; the DP engine's state -- step, accountant -- travels in the client state as always).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from dist_dpc.engine.ds_config import config_zero_stage
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
        if tag == self.latest():
            return tag  # this very state is on disk already (e.g. a stop right after a resume)
        # A tag that exists but is not the latest is what a killed save left: another attempt's
        # shards, maybe of more ranks than this one writes, which a conversion to the universal
        # format would merge into this state. Removed before anything is written under that name.
        if self.world.is_main:
            shutil.rmtree(self.directory / tag, ignore_errors=True)
            shutil.rmtree(self.directory / f"{tag}{UNIVERSAL}", ignore_errors=True)
        torch.distributed.barrier()
        private_dir(self.directory)  # every rank: each may be the first to write (node-local disks)
        engine.save_checkpoint(self.directory, tag, client_state)
        if self.world.is_main:
            layout = {"world_size": self.world.world_size, "zero_stage": int(engine.ds.zero_optimization_stage())}
            atomic_write(self.directory / tag / LAYOUT, lambda tmp: tmp.write_text(json.dumps(layout)), mode=PRIVATE_FILE)
        make_private_tree(self.directory)  # before any other rank's cleanup can start (barrier below)
        torch.distributed.barrier()  # every rank's shard is on disk before the pointer moves
        if self.world.is_main:
            atomic_write(self.directory / "latest_complete", lambda tmp: tmp.write_text(tag), mode=PRIVATE_FILE)
            tags = sorted(p.name for p in self.directory.glob("step*") if p.is_dir() and not p.name.endswith(UNIVERSAL))
            for old in tags[:-self.keep]:
                shutil.rmtree(self.directory / old, ignore_errors=True)
                shutil.rmtree(self.directory / f"{old}{UNIVERSAL}", ignore_errors=True)
        torch.distributed.barrier()
        return tag

    def needs_universal(self, zero_stage: int) -> bool:
        """True when the latest checkpoint must be loaded through DeepSpeed's universal format: it
        was written at another world size with partitioned optimizer state. Call before building
        the engine (``checkpoint.load_universal`` is a DeepSpeed config setting). Refuses a ZeRO stage
        other than the one the checkpoint was written at."""
        tag = self.latest()
        if tag is None or not (self.directory / tag / LAYOUT).is_file():
            return False
        layout = json.loads((self.directory / tag / LAYOUT).read_text())
        if layout["zero_stage"] != zero_stage:
            raise ValueError(f"the checkpoint {self.directory / tag} was written at ZeRO stage {layout['zero_stage']}, "
                             f"this run is at train.zero_stage={zero_stage}: resume with "
                             f"train.zero_stage={layout['zero_stage']} (the world size may change)")
        return zero_stage >= 1 and layout["world_size"] != self.world.world_size

    def resume_config(self, ds_config: dict) -> tuple[dict, bool]:
        """The DeepSpeed config for the engine that will resume from the latest checkpoint, and whether
        it loads through the universal format (a checkpoint of another world size: DeepSpeed
        re-partitions it). Call before building the engine."""
        universal = self.needs_universal(config_zero_stage(ds_config))
        if universal:
            ds_config = {**ds_config, "checkpoint": {**ds_config.get("checkpoint", {}), "load_universal": True}}
        return ds_config, universal

    def load(self, engine, universal: bool = False) -> dict:
        tag = self.latest()
        if tag is None:
            raise FileNotFoundError(f"no complete checkpoint in {self.directory}")
        if universal:
            tag = self._universal(tag)
        return engine.load_checkpoint(self.directory, tag)

    def _universal(self, tag: str) -> str:
        """``TAG-universal``, converted once by rank 0 with DeepSpeed's converter (to a temporary
        name, renamed when complete, so a kill mid-way leaves nothing half-written to load)."""
        target = f"{tag}{UNIVERSAL}"
        if self.world.is_main and not (self.directory / target).is_dir():
            layout = json.loads((self.directory / tag / LAYOUT).read_text())
            shards = list((self.directory / tag).glob("*optim_states.pt"))
            if len(shards) != layout["world_size"]:
                raise RuntimeError(f"{self.directory / tag} holds {len(shards)} optimizer shards but was written by "
                                   f"{layout['world_size']} ranks: it cannot be converted safely. Resume on "
                                   f"{layout['world_size']} ranks")
            partial = self.directory / f"{target}.partial"
            shutil.rmtree(partial, ignore_errors=True)
            workers = str(max(1, min(4, os.cpu_count() or 1)))
            # umask 077: the converter's files (weights, Adam moments) are private from their creation.
            proc = subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal",
                                   "--input_folder", str(self.directory / tag), "--output_folder", str(partial),
                                   "--num_extract_workers", workers, "--num_merge_workers", "1",
                                   "--inject_missing_state"], capture_output=True, text=True,
                                  preexec_fn=lambda: os.umask(0o077))
            (self.directory / "latest_universal").unlink(missing_ok=True)  # the converter's pointer; unused
            if proc.returncode != 0:
                raise RuntimeError(f"DeepSpeed could not convert {self.directory / tag} for another world size "
                                   f"(deepspeed.checkpoint.ds_to_universal):\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}"
                                   f"\nResume at the world size the checkpoint was written at")
            make_private_tree(partial)
            os.replace(partial, self.directory / target)
        torch.distributed.barrier()
        return target


LAYOUT = "layout.json"  # the world size and ZeRO stage a tag was written at
UNIVERSAL = "-universal"
