"""Run directories: created once, never clobbered; resumable when unfinished."""

from __future__ import annotations

import json
import secrets
from pathlib import Path

import yaml

from dist_dpc.privacy.randomness import SecretKey, broadcast_key
from dist_dpc.utils.atomic import PRIVATE_FILE, atomic_write, private_dir
from dist_dpc.utils.config_loader import to_dict


class RunDirectoryError(ValueError):
    """The run directory exists and holds something this run must not overwrite."""


_MISSING = "<absent>"
# Fields added after trees were written whose default reproduces the behaviour before them.
ADDED_FIELDS = {"model.task", "data.control_code_columns", "data.eval_stride", "histogram", "distill_synthetic", "audit"}


def _differences(old: dict, new: dict, prefix: str = "", defaults: dict | None = None) -> list[str]:
    """Dotted keys whose values differ (run.overwrite, wandb.*, cluster.* and generate.* may change
    between attempts: generation samples from the trained models and keeps its own plan). A key the
    saved config lacks (a field added since the tree was written) counts as unchanged when its new
    value is the field's default, for the fields in ADDED_FIELDS (whose default is the behaviour before
    they existed); any other missing key, or a missing key now set (to anything, None included), differs."""
    out, defaults = [], defaults or {}
    for key in sorted(set(old) | set(new)):
        name = f"{prefix}{key}"
        if name in ("run.overwrite",) or name.startswith(("wandb", "cluster", "generate")):
            continue
        if key not in old and name in ADDED_FIELDS and key in defaults and new.get(key) == defaults[key]:
            continue
        a, b = old.get(key, _MISSING), new.get(key, _MISSING)
        if isinstance(a, dict) and isinstance(b, dict):
            sub = defaults.get(key) if isinstance(defaults.get(key), dict) else {}
            out.extend(_differences(a, b, name + ".", sub))
        elif a != b:
            out.append(f"{name}: {a!r} -> {b!r}")
    return out


class RunDir:
    def __init__(self, path: Path, world):
        self.path, self.world = path, world

    @classmethod
    def prepare(cls, cfg, world, phase_dir: Path | None = None) -> "RunDir":
        """Checked by every rank (same answer everywhere), created by rank 0. ``phase_dir``: where the
        phase about to run writes its results (the run root for a single-phase run)."""
        path = Path(cfg.run.output_dir) / cfg.run.name
        phase_dir = path if phase_dir is None else Path(phase_dir)
        if (phase_dir / "results.json").exists() and not cfg.run.overwrite:
            what = "run" if phase_dir == path else f"{phase_dir.name} phase"
            raise RunDirectoryError(
                f"{phase_dir} already holds a finished {what}; choose another run.name "
                f"(e.g. run.name={cfg.run.name}-2) or set run.overwrite=true to write over its results")
        if path.exists() and not path.is_dir():
            raise RunDirectoryError(f"run directory {path} exists and is not a directory; choose another run.name")
        saved = path / "config.yaml"
        if saved.is_file() and not cfg.run.overwrite:
            differing = _differences(yaml.safe_load(saved.read_text()) or {}, to_dict(cfg), defaults=to_dict(type(cfg)()))
            if differing:
                raise RunDirectoryError(
                    f"run directory {path} holds a run with a different config ({', '.join(differing[:6])}); "
                    "resuming it with other settings would mix two runs. Choose another run.name, or restore "
                    "those values to resume it")
        if world.is_main:
            private_dir(path)  # 0700: it holds checkpoints, the tokenised private data, maybe a seed
        return cls(path, world)

    def noise_key(self, privacy) -> SecretKey:
        """The root key of this process's noise and sampling (phases derive theirs from it).

        secure (default): 256 bits of OS entropy on rank 0, sent to the other ranks in memory and
        written nowhere; a restarted phase therefore draws fresh noise and batches.
        insecure_reproducible: derived from privacy.noise_seed, or from a seed drawn once and kept in
        noise_seed.json (0600) so a resumed run continues the same streams; anyone who can read that
        file or the config can subtract the noise."""
        if privacy.randomness == "secure":
            return broadcast_key(SecretKey.generate() if self.world.is_main else None, self.world.world_size)
        if privacy.noise_seed is not None:
            return SecretKey.from_seed(privacy.noise_seed)
        return SecretKey.from_seed(self._kept_seed())

    def _kept_seed(self) -> int:
        """insecure_reproducible without privacy.noise_seed: noise_seed.json's seed, drawn on first use."""
        import torch

        seed_file = self.path / "noise_seed.json"
        seed, drawn = 0, False
        if self.world.is_main:  # rank 0 alone decides, so every rank joins the same broadcast
            drawn = not seed_file.exists()
            seed = secrets.randbits(128) if drawn else int(json.loads(seed_file.read_text())["seed"])
        if torch.distributed.is_initialized() and self.world.world_size > 1:
            box = [seed]
            torch.distributed.broadcast_object_list(box, src=0)
            seed = int(box[0])
        if drawn:
            self.write_json("noise_seed.json", {"seed": seed}, mode=PRIVATE_FILE)
        return seed

    def write_json(self, name: str | Path, data: dict, mode: int | None = None) -> None:
        # A Path names the file itself (a phase directory's); a string is relative to the run root.
        target = name if isinstance(name, Path) else self.path / name
        text = json.dumps(data, indent=2, default=str)
        atomic_write(target, lambda tmp: tmp.write_text(text), mode=mode)
