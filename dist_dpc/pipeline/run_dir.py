"""Run directories: created once, never clobbered; resumable when unfinished."""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path


class RunDirectoryError(ValueError):
    """The run directory exists and holds something this run must not overwrite."""


class RunDir:
    def __init__(self, path: Path, world):
        self.path, self.world = path, world

    @classmethod
    def prepare(cls, cfg, world) -> "RunDir":
        """Checked by every rank (same answer everywhere), created by rank 0."""
        path = Path(cfg.run.output_dir) / cfg.run.name
        if (path / "results.json").exists() and not cfg.run.overwrite:
            raise RunDirectoryError(
                f"run directory {path} already holds a finished run; choose another run.name "
                f"(e.g. run.name={cfg.run.name}-2) or set run.overwrite=true to write over its results")
        if path.exists() and not path.is_dir():
            raise RunDirectoryError(f"run directory {path} exists and is not a directory; choose another run.name")
        if world.is_main:
            path.mkdir(parents=True, exist_ok=True)
        return cls(path, world)

    def noise_seed(self, configured: int | None) -> int:
        """The seed of noise and sampling: configured, or drawn once from the OS and kept with the run
        (so a resumed run continues the same streams). All ranks read the same file."""
        import torch

        seed_file = self.path / "noise_seed.json"
        if configured is not None:
            seed = int(configured)
        elif seed_file.exists():
            seed = int(json.loads(seed_file.read_text())["seed"])
        else:
            seed = secrets.randbits(62) if self.world.is_main else 0
            if torch.distributed.is_initialized() and self.world.world_size > 1:
                box = [seed]
                torch.distributed.broadcast_object_list(box, src=0)
                seed = int(box[0])
        if self.world.is_main and not seed_file.exists():
            self.write_json("noise_seed.json", {"seed": seed})
        return seed

    def write_json(self, name: str, data: dict) -> None:
        target = self.path / name
        tmp = target.with_name(target.name + ".tmp")
        tmp.write_text(json.dumps(data, indent=2, default=str))
        os.replace(tmp, target)
