"""Experiment tracking behind a tiny interface: a no-op base and W&B (imported lazily, rank 0 only)."""

from __future__ import annotations

import math
import os
import secrets
import sys
from pathlib import Path


class Tracker:
    """Does nothing: what every rank but global rank 0 gets, and what `wandb.mode=disabled` gives."""

    def log(self, metrics: dict, step: int) -> None: ...

    def summary(self, values: dict) -> None: ...

    def table(self, key: str, columns: list[str], rows: list[list]) -> None: ...

    def artifact(self, directory: Path, name: str, kind: str, metadata: dict) -> None: ...

    def finish(self) -> None: ...


class WandbTracker(Tracker):
    def __init__(self, *, project: str, entity: str | None, mode: str, run_dir: Path, group: str, phase: str,
                 config: dict):
        import wandb

        if mode == "online" and not (os.environ.get("WANDB_API_KEY") or _netrc_has_wandb()):
            print("W&B: no API key configured, logging offline", file=sys.stderr)
            mode = "offline"
        # The run id is kept in the run directory: a resumed phase continues the same W&B run.
        id_file = run_dir / "wandb_run_id"
        run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(4)
        id_file.write_text(run_id)
        self.mode = mode
        self.run = wandb.init(project=project, entity=entity, group=group, job_type=phase, name=f"{group}-{phase}",
                              id=run_id, resume="allow", dir=str(run_dir), config=config, mode=mode,
                              settings=wandb.Settings(quiet=True, console="off"))

    def log(self, metrics: dict, step: int) -> None:
        self.run.log(_finite(metrics), step=step)

    def summary(self, values: dict) -> None:
        for key, value in _finite(values).items():
            self.run.summary[key] = value

    def table(self, key: str, columns: list[str], rows: list[list]) -> None:
        import wandb

        table = wandb.Table(columns=columns, data=rows)
        self.run.log({key: table})
        self.run.summary[key] = table

    def artifact(self, directory: Path, name: str, kind: str, metadata: dict) -> None:
        import wandb

        art = wandb.Artifact(name=name, type=kind, metadata=_finite(metadata))
        art.add_dir(str(directory))
        self.run.log_artifact(art)

    def finish(self) -> None:
        directory = self.run.dir
        self.run.finish()
        if self.mode == "offline":
            print(f"W&B run saved offline; upload it with: wandb sync {Path(directory).parent}", flush=True)


def _finite(values: dict) -> dict:
    """W&B stores JSON: an infinite epsilon (noise off) becomes the string "inf"."""
    return {k: (str(v) if isinstance(v, float) and not math.isfinite(v) else v) for k, v in values.items()}


def _netrc_has_wandb() -> bool:
    import netrc

    try:
        return any("wandb" in host for host in netrc.netrc().hosts)
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def make_tracker(wandb_cfg, *, world, run_dir: Path, group: str, phase: str, config: dict) -> Tracker:
    if not world.is_main or wandb_cfg.mode == "disabled":
        return Tracker()
    return WandbTracker(project=wandb_cfg.project, entity=wandb_cfg.entity, mode=wandb_cfg.mode, run_dir=run_dir,
                        group=group, phase=phase, config=config)
