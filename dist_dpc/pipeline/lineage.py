"""Where a model's privacy cost comes from, and how it follows the model into another run tree.

Every model directory a phase saves carries ``privacy_lineage.json``: the ledger's mechanisms at the
moment the model was written (the run tree's whole spend so far: conservative, it includes sibling
phases), N, delta, and whether it was trained with DP at all. Copying the directory (export, a user's
``cp -r``) copies its lineage.

A phase that starts from a model directory (``model.name``, ``distill.teacher``, ``distill.student``,
a prune source) calls :func:`import_lineage` before spending anything:

* a directory whose lineage says it was trained without DP: refused (in this tree or not);
* a model of this run tree (its lineage names this ledger's id): its cost is in our ledger already;
* any other directory with a lineage file: its mechanisms are recorded as ``imported:<directory>``
  (trained on the same private data, so they compose with ours; other N is refused);
* a phase model of an older run tree without lineage files (results.json beside it): read from
  that tree's ledger;
* a hub name, an alias or a debug model: public, nothing to import;
* any other local directory: refused, unless the user lists it in ``privacy.public_model_dirs``
  (it is then recorded as a ``public:<directory>`` declaration with no mechanisms, so the report
  shows the claim that was made).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from dist_dpc.privacy.accounting import Mechanism, mechanism_from_dict
from dist_dpc.privacy.ledger import PrivacyLedger
from dist_dpc.utils.atomic import atomic_write
from dist_dpc.utils.logging import log

LINEAGE_FILE = "privacy_lineage.json"
LEDGER_FILE = "privacy_ledger.json"


class UnknownLineageError(ValueError):
    """A model directory of unknown origin: it may have seen the private data without DP."""


def write_lineage(model_dir: Path, ledger: PrivacyLedger | None, *, phase: str) -> None:
    """Write the lineage of a model saved into ``model_dir`` (rank 0, after the model files)."""
    if ledger is None:
        data = {"format": 1, "private": False, "phase": phase}
    else:
        data = {"format": 1, "private": True, "phase": phase, "ledger_id": ledger.ledger_id,
                "dataset_size": ledger.dataset_size, "delta": ledger.delta, "accountant": ledger.accountant,
                "mechanisms": [m.to_dict() for m in ledger.mechanisms()]}
    text = json.dumps(data, indent=2)
    atomic_write(Path(model_dir) / LINEAGE_FILE, lambda tmp: tmp.write_text(text))


def read_lineage(model_dir: Path) -> dict | None:
    """The lineage stored with a model directory: its file, or, for a phase model of a run tree
    written before lineage files existed (its results.json beside it), that tree's ledger."""
    model_dir = Path(model_dir)
    stored = model_dir / LINEAGE_FILE
    if stored.is_file():
        return json.loads(stored.read_text())
    results = _read_json(model_dir.parent / "results.json")
    if results is None:
        return None
    if results.get("private") is False:
        return {"private": False}
    for tree in (model_dir.parent, model_dir.parent.parent):  # RUN/model (dpc train), RUN/PHASE/model
        ledger_file = tree / LEDGER_FILE
        if ledger_file.is_file():
            data = json.loads(ledger_file.read_text())
            theirs = PrivacyLedger(ledger_file, data.get("target_epsilon"), data["delta"], data["dataset_size"],
                                   data.get("accountant", "prv"))
            return {"private": True, "dataset_size": theirs.dataset_size, "delta": theirs.delta,
                    "ledger_id": theirs.ledger_id, "ledger_path": str(ledger_file.resolve()),
                    "mechanisms": [m.to_dict() for m in theirs.mechanisms()]}
    return None


def import_lineage(ctx, model_ref: str | Path, *, role: str) -> None:
    """Bring the privacy cost of the model ``model_ref`` into this run's ledger before it is used
    (``role`` names the config field it came from, for messages). Every rank calls it."""
    from dist_dpc.models.loading import ALIASES, DEBUG_MODELS

    name = str(model_ref)
    path = Path(name)
    if name in DEBUG_MODELS or name in ALIASES or not path.exists():
        return  # built from a config, a packaged public model, or a hub name: public weights
    model_dir = path.resolve()
    # Always read the lineage, wherever the directory lies: a model inside this tree may have been
    # trained without DP, or copied in from another tree.
    lineage = read_lineage(model_dir)
    if lineage is not None and lineage.get("private") is False:
        if ctx.cfg.privacy.enabled:
            raise ValueError(f"{role}={name!r} was trained on private data WITHOUT differential privacy; nothing "
                             "derived from it has a DP guarantee. Train it with privacy.enabled=true")
        return
    if ctx.ledger is None:
        return  # a non-private run claims nothing
    if lineage is None:
        declared = {str(Path(p).resolve()) for p in ctx.cfg.privacy.public_model_dirs}
        if str(model_dir) not in declared:
            raise UnknownLineageError(
                f"{role}={name!r} is a local model directory without a dist-dpc privacy lineage "
                f"({LINEAGE_FILE}), so whether it saw the private data is unknown. If it was trained on public "
                f"data only, say so with privacy.public_model_dirs=[{name}] (recorded in the ledger as a "
                "declaration); if it came from a dist-dpc run, give the model directory that run wrote")
        _record(ctx, f"public:{model_dir}", [])
        log(ctx.world, f"[{ctx.phase}] {role}={name}: declared public (privacy.public_model_dirs), recorded as such")
        return
    if _same_ledger(lineage, ctx.ledger):
        return  # a model of this very tree: its mechanisms are in our ledger already
    if int(lineage["dataset_size"]) != ctx.ledger.dataset_size:
        raise ValueError(f"{role}={name!r} was trained on a data set of N={lineage['dataset_size']}, this run has "
                         f"N={ctx.ledger.dataset_size}: importing its privacy cost needs the same private data set")
    mechanisms = [mechanism_from_dict(m) for m in lineage["mechanisms"]]
    _record(ctx, f"imported:{model_dir}", mechanisms)
    log(ctx.world, f"[{ctx.phase}] imported the privacy cost of {model_dir} ({len(mechanisms)} mechanisms) into "
                   "this run's ledger")


def _record(ctx, entry: str, mechanisms: list[Mechanism]) -> None:
    """Record an import once: the same lineage again is a no-op (the ledger's idempotent record of a
    completed entry); a different one from the same directory (the source was retrained) is added."""
    if ctx.is_main:
        for k in range(1, 1000):
            name = entry if k == 1 else f"{entry}#{k}"
            try:
                ctx.ledger.record(name, mechanisms, status="completed")
                break
            except ValueError:  # that entry is completed with other mechanisms: never replace it
                continue
        else:  # never proceed with a cost left out of the ledger
            raise RuntimeError(f"{ctx.ledger.path}: 999 different lineages were imported as {entry!r}; the privacy "
                               "cost of this one could not be recorded")
    torch.distributed.barrier()


def _same_ledger(lineage: dict, ledger: PrivacyLedger) -> bool:
    if lineage.get("ledger_id") and lineage["ledger_id"] == ledger.ledger_id:
        return True
    return lineage.get("ledger_path") == str(ledger.path.resolve())


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
