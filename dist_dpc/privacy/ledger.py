"""One privacy ledger per run tree: every release that reads the private data is recorded here.

The total epsilon is the composition of all recorded mechanisms by opacus' PRV accountant
(heterogeneous composition, never a sum of per-phase epsilons). The ledger is bound to one data set
(N) and one delta; it is never reset.

Entries. Each attempt of a spending phase is one entry: the first attempt of ``teacher`` is the
entry ``teacher``, a re-run after it completed (``run.overwrite=true``) appends ``teacher#2``, and so
on. A *running* entry counts its whole reservation (the plan made before the first private read);
a *completed* entry counts what was released. A completed entry is never replaced or erased, so a
re-run can only add spend, never reset it. A resumed attempt (killed before it completed) keeps its
entry and its reservation.

Reservation. ``reserve`` calibrates, checks and records a phase's plan while holding the ledger's
lock, so two phases started at once cannot both calibrate against the same spend and overspend
together. ``release`` appends a mechanism to an entry as it is released (a DP mean, a probe, a
phase's DP-SGD steps); ``complete`` makes what was released the entry's count. Callers never add
mechanisms up themselves: ``prior`` gives everything a new release composes with.

Durability. Each record rewrites the file atomically: a temporary file in the same directory is
written and fsynced, then ``os.replace``d over the ledger, then the directory is fsynced, so a crash
at any point leaves either the previous or the new ledger, both complete. Writers take an exclusive
``fcntl`` lock on ``<ledger>.lock`` and re-read the file under it, so phases recorded by other
processes are kept. Readers re-read the file (atomic renames make that safe without the lock).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Callable, Iterator, Sequence

from dist_dpc.privacy.accounting import (Mechanism, RdpCurve, _check_accountant, _check_dataset_size, _check_delta,
                                         calibrate_noise_multiplier, compute_epsilon, mechanism_from_dict,
                                         with_phase)

try:  # POSIX; elsewhere writers are not serialised across processes
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None

STATUSES = ("planned", "running", "completed")
FORMAT_VERSION = 3  # 3: entries may carry output_at_step and runs (dist_dpc.initialize's resume)
ATTEMPT_SEPARATOR = "#"
RELATIVE_SLACK = 1e-6  # budget checks allow this much relative excess (float noise in the accountants)


class PrivacyBudgetExceeded(RuntimeError):
    """Recording or starting this phase would push the run's total epsilon past the target."""


class PrivacyLedger:
    """One ledger per run tree: every phase that reads the private data records its mechanisms here.
    The total epsilon is the PRV composition of all recorded mechanisms (heterogeneous), never a sum."""

    def __init__(self, path: str | Path, target_epsilon: float | None, delta: float, dataset_size: int,
                 accountant: str = "prv"):
        _check_accountant(accountant)
        _check_delta(delta)
        if target_epsilon is not None and not 0 < target_epsilon < math.inf:
            raise ValueError(f"privacy.target_epsilon={target_epsilon!r} must be a finite number > 0 (or None)")
        self.path = Path(path)
        self.target_epsilon = None if target_epsilon is None else float(target_epsilon)
        self.delta, self.dataset_size, self.accountant = float(delta), _check_dataset_size(dataset_size), accountant
        self._phases: dict[str, dict] = {}
        self._id: str | None = None
        self._refresh()

    # -- reading ---------------------------------------------------------------------------------
    def _read(self) -> dict[str, dict] | None:
        """The phases stored on disk (None if there is no file yet); refuses a foreign ledger."""
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return None
        try:
            data = json.loads(text)
            if int(data.get("version", 1)) > FORMAT_VERSION:
                raise RuntimeError(f"the privacy ledger {self.path} has format {data['version']}, newer than this "
                                   f"dist-dpc reads ({FORMAT_VERSION}): it could drop fields the newer one relies on. "
                                   "Use the dist-dpc version that wrote it, or a newer one")
            stored_delta, stored_n = float(data["delta"]), int(data["dataset_size"])
            self._id = data.get("ledger_id", self._id)
            phases = {str(name): _entry_from_json(str(name), entry) for name, entry in data["phases"].items()}
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise ValueError(f"the privacy ledger {self.path} is unreadable ({type(err).__name__}: {err}); it is never "
                             "reset automatically: restore it from a backup or inspect it by hand") from err
        if not math.isclose(stored_delta, self.delta, rel_tol=1e-12) or stored_n != self.dataset_size:
            raise ValueError(
                f"the privacy ledger {self.path} is bound to delta={stored_delta:.6g} and N={stored_n} training "
                f"examples, but this run has delta={self.delta:.6g} and N={self.dataset_size}: a ledger covers one "
                "data set and one delta. Use the same privacy.delta and data, or a new run tree for other data")
        return phases

    def _refresh(self) -> None:
        phases = self._read()
        if phases is not None:
            self._phases = phases

    def mechanisms(self, exclude_phase: str | None = None) -> list[Mechanism]:
        """All recorded mechanisms (phase by phase, in first-recorded order), optionally without one phase's."""
        self._refresh()
        return [m for name, entry in self._phases.items() if name != exclude_phase for m in _as_mechanisms(name, entry)]

    def phases(self) -> dict[str, dict]:
        """phase -> {"mechanisms": [Mechanism.to_dict(), ...], "status": ...} (a copy)."""
        self._refresh()
        return json.loads(json.dumps(self._phases))

    def total_epsilon(self, accountant: str | None = None) -> float:
        return compute_epsilon(self.mechanisms(), self.delta, accountant or self.accountant)

    def remaining_fraction(self) -> float | None:
        """1 - total/target (None without a target). Epsilons do not add up, so this is only a gauge:
        use check_planned / calibrate_phase to decide what a phase may spend."""
        if self.target_epsilon is None:
            return None
        return max(0.0, 1.0 - self.total_epsilon() / self.target_epsilon)

    # -- writing ---------------------------------------------------------------------------------
    def record(self, phase: str, mechanisms: Sequence[Mechanism], status: str = "running") -> None:
        """Set entry ``phase``'s counted mechanisms and status, durably. A running entry may be
        replaced (a resumed attempt re-states its plan); a completed one is permanent: re-recording
        it is allowed only with the same mechanisms (idempotent), anything else is refused."""
        if not isinstance(phase, str) or not phase:
            raise ValueError(f"phase={phase!r} must be a non-empty string")
        if status not in STATUSES:
            raise ValueError(f"status={status!r} must be one of {', '.join(STATUSES)}")
        counted = _canonical(mechanisms, phase)
        with self._lock():
            phases = self._locked_phases()
            old = phases.get(phase)
            if old is not None and old["status"] == "completed":
                if old["mechanisms"] == counted and status == "completed":
                    return
                raise ValueError(f"ledger entry {phase!r} is completed: what it released stays spent. A re-run of a "
                                 "phase is a new attempt (PrivacyLedger.reserve appends one); it never replaces it")
            entry = dict(old) if old is not None else _new_entry(phase)
            entry.update(mechanisms=counted, status=status)
            if status == "completed" and old is None:
                entry["released"] = counted
            phases[phase] = entry  # an existing entry keeps its position
            self._commit(phases)

    def reserve(self, phase: str, plan: Callable[[list[Mechanism], dict | None], Sequence[Mechanism]],
                reservation: Callable[[], dict] | None = None) -> str:
        """Plan, check and record ``phase``'s spend in one step under the ledger lock; returns its entry.

        The entry is the phase's latest attempt while that is still running (a resumed phase keeps its
        reservation), else a new attempt. ``plan(others)`` gets the mechanisms of every other entry
        (what the new plan composes with) and the entry's earlier reservation (a resumed attempt; else
        None), and returns the planned mechanisms (e.g. after calibrating sigma against ``others``); the
        plan is refused with PrivacyBudgetExceeded if the total would exceed target_epsilon.
        ``reservation()``, called after ``plan``, gives what is stored with the entry (e.g. sigma, q,
        steps) so that other ranks and a resumed attempt read the same numbers."""
        with self._lock():
            phases = self._locked_phases()
            entry_name = _open_attempt(phases, phase)
            others = [m for name, e in phases.items() if name != entry_name for m in _as_mechanisms(name, e)]
            previous = (phases.get(entry_name) or {}).get("reservation")
            planned = list(plan(list(others), previous))
            # A resumed attempt keeps counting what it already released, whatever its new plan says
            # (a plan whose fixed mechanisms changed between a crash and the resume must not drop them).
            counted = _canonical(planned, entry_name)
            released = (phases.get(entry_name) or {}).get("released") or []
            if released:
                counted = _dominating(counted, _canonical([mechanism_from_dict(m) for m in released], entry_name),
                                      entry_name)
            total = self._check_total(entry_name, others, _as_mechanisms(entry_name, {"mechanisms": counted}))
            entry = dict(phases.get(entry_name) or _new_entry(phase, _attempt_number(entry_name)))
            entry.update(mechanisms=counted, status="running",
                         reservation=dict(reservation() if reservation else {}), planned_total_epsilon=total)
            phases[entry_name] = entry
            self._commit(phases)
        return entry_name

    def release(self, entry: str, mechanisms: Sequence[Mechanism]) -> None:
        """Append ``mechanisms`` to what entry ``entry`` has released (call it as the release happens:
        before the result is written anywhere). A running entry keeps counting its reservation; the
        released list is what it counts once completed, and what later releases compose with."""
        with self._lock():
            phases = self._locked_phases()
            if entry not in phases:
                raise KeyError(f"no ledger entry {entry!r}: reserve the phase before releasing anything")
            if phases[entry]["status"] == "completed":
                raise ValueError(f"ledger entry {entry!r} is completed; a further release needs a new attempt")
            e = dict(phases[entry])
            e["released"] = list(e.get("released", [])) + [m.to_dict() for m in _with_phase(mechanisms, entry)]
            # A running entry counts its reservation -- or more, if it released more than it reserved
            # (a DP mean recomputed after a crash, a prune round replayed): per (sigma, q), the larger.
            e["mechanisms"] = _dominating(e["mechanisms"], _canonical([mechanism_from_dict(m) for m in e["released"]],
                                                                      entry), entry)
            phases[entry] = e
            self._commit(phases)

    def complete(self, entry: str) -> list[Mechanism]:
        """Entry ``entry`` is done: from now on it counts what it released (identical (sigma, q)
        releases merged, which composition allows). Returns those mechanisms."""
        with self._lock():
            phases = self._locked_phases()
            if entry not in phases:
                raise KeyError(f"no ledger entry {entry!r}")
            e = dict(phases[entry])
            if e["status"] != "completed":
                released = [mechanism_from_dict(m) for m in e.get("released", [])]
                e.update(mechanisms=_canonical(released, entry), status="completed")
                phases[entry] = e
                self._commit(phases)
            return [mechanism_from_dict({**m, "phase": entry}) for m in e["mechanisms"]]

    def note_output(self, entry: str, step: int) -> None:
        """Entry ``entry``'s run published something computed from its state after ``step`` steps (a
        saved model). A resumed run may not restart from a checkpoint before it: the steps in between
        would be counted once for two different published trajectories."""
        with self._lock():
            phases = self._locked_phases()
            if entry not in phases:
                raise KeyError(f"no ledger entry {entry!r}")
            e = dict(phases[entry])
            e["output_at_step"] = max(int(e.get("output_at_step", 0)), int(step))
            phases[entry] = e
            self._commit(phases)

    def start_run(self, entry: str) -> int:
        """Count one more process training in entry ``entry`` (the first run, then each resume) and return
        its number: each run draws its own noise (dist_dpc.initialize keys it by this number)."""
        with self._lock():
            phases = self._locked_phases()
            if entry not in phases:
                raise KeyError(f"no ledger entry {entry!r}")
            e = dict(phases[entry])
            e["runs"] = int(e.get("runs", 0)) + 1
            phases[entry] = e
            self._commit(phases)
            return e["runs"]

    def released(self, entry: str) -> list[Mechanism]:
        """What entry ``entry`` has released so far (in release order)."""
        self._refresh()
        e = self._phases.get(entry) or {}
        return [mechanism_from_dict({**m, "phase": entry}) for m in e.get("released", [])]

    def prior(self, entry: str) -> list[Mechanism]:
        """What a new release of ``entry`` composes with: every other entry's count, then what
        ``entry`` itself has released so far."""
        self._refresh()
        others = [m for name, e in self._phases.items() if name != entry for m in _as_mechanisms(name, e)]
        return others + self.released(entry)

    @property
    def ledger_id(self) -> str | None:
        """A random public name of this ledger (written with its first entry): a model's lineage
        carries it, so a model of this very tree is recognised wherever its directory lies."""
        self._refresh()
        return self._id

    def entry(self, name: str) -> dict:
        """One entry (a copy): phase, attempt, status, mechanisms, released, reservation."""
        self._refresh()
        if name not in self._phases:
            raise KeyError(f"no ledger entry {name!r}")
        return json.loads(json.dumps(self._phases[name]))

    def latest_attempt(self, phase: str) -> str | None:
        """The entry of ``phase``'s latest attempt (None if the phase never reserved)."""
        self._refresh()
        names = [n for n, e in self._phases.items() if e.get("phase", n) == phase]
        return names[-1] if names else None

    def _locked_phases(self) -> dict[str, dict]:
        phases = self._read()
        return dict(self._phases if phases is None else phases)

    def _commit(self, phases: dict[str, dict]) -> None:
        self._write(phases)
        self._phases = phases

    def _check_total(self, entry: str, others: list[Mechanism], planned: list[Mechanism]) -> float:
        total = compute_epsilon(others + list(planned), self.delta, self.accountant)
        if self.target_epsilon is not None and total > self.target_epsilon * (1 + RELATIVE_SLACK):
            spent = compute_epsilon(others, self.delta, self.accountant)
            raise PrivacyBudgetExceeded(
                f"phase {entry!r} would bring the run's total epsilon to {total:.4g} (composition of all phases, "
                f"delta={self.delta:.3g}, {self.accountant}) > privacy.target_epsilon={self.target_epsilon:g}; "
                f"the other phases (and earlier attempts) already spend {spent:.4g}. Raise the noise "
                "(privacy.noise_multiplier), train fewer steps/epochs, use a larger privacy.target_epsilon, or a "
                "different split of the budget between phases")
        return total

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if fcntl is None:  # pragma: no cover
            yield
            return
        with open(self.path.with_name(self.path.name + ".lock"), "a") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock.fileno(), fcntl.LOCK_UN)

    def _write(self, phases: dict[str, dict]) -> None:
        if self._id is None:
            import secrets

            self._id = secrets.token_hex(16)  # public: names this ledger, reveals nothing
        data = {"version": FORMAT_VERSION, "ledger_id": self._id, "target_epsilon": self.target_epsilon, "delta": self.delta,
                "dataset_size": self.dataset_size, "accountant": self.accountant, "phases": phases}
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w") as fh:
                json.dump(data, fh, indent=2)
                fh.write("\n")
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        with contextlib.suppress(OSError):  # make the rename itself durable
            dir_fd = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)

    # -- budget ----------------------------------------------------------------------------------
    def check_planned(self, phase: str, planned: Sequence[Mechanism]) -> float:
        """Epsilon of (all other entries' mechanisms + ``planned`` for entry ``phase``); raises
        PrivacyBudgetExceeded if that exceeds target_epsilon."""
        return self._check_total(phase, self.mechanisms(exclude_phase=phase), list(planned))

    def calibrate_phase(self, phase: str, sample_rate: float, steps: int, phase_epsilon_target: float,
                        extra: Sequence[Mechanism] = ()) -> float:
        """sigma such that (the other phases' mechanisms + this phase's fixed ``extra`` mechanisms +
        its (sigma, q, steps)) composes to ``phase_epsilon_target``, a *cumulative* target: for a 50/50
        split of epsilon=4 the first phase calibrates to 2.0 and the second to 4.0."""
        if self.target_epsilon is not None and phase_epsilon_target > self.target_epsilon * (1 + RELATIVE_SLACK):
            raise ValueError(f"phase {phase!r}: cumulative target epsilon {phase_epsilon_target:g} exceeds the run's "
                             f"privacy.target_epsilon={self.target_epsilon:g}")
        try:
            return calibrate_noise_multiplier(phase_epsilon_target, self.delta, sample_rate, steps, self.accountant,
                                              prior=(*self.mechanisms(exclude_phase=phase), *extra))
        except ValueError as err:
            raise ValueError(f"phase {phase!r}: {err}") from err

    def to_dict(self) -> dict:
        """For reports."""
        phases = self.phases()
        return {"target_epsilon": self.target_epsilon, "delta": self.delta, "dataset_size": self.dataset_size,
                "accountant": self.accountant, "phases": phases,
                "total_epsilon_prv": self.total_epsilon("prv"), "total_epsilon_rdp": self.total_epsilon("rdp"),
                "remaining_fraction": self.remaining_fraction()}


# -- entries --------------------------------------------------------------------------------------------
def _new_entry(phase: str, attempt: int = 1) -> dict:
    name = phase.split(ATTEMPT_SEPARATOR)[0]
    return {"phase": name, "attempt": attempt, "status": "running", "mechanisms": [], "released": []}


def _attempt_number(entry: str) -> int:
    _, _, number = entry.partition(ATTEMPT_SEPARATOR)
    return int(number) if number else 1


def _open_attempt(phases: dict[str, dict], phase: str) -> str:
    """The entry a phase about to run spends in: its latest attempt if still running, else a new one."""
    attempts = [name for name, e in phases.items() if e.get("phase", name) == phase]
    if attempts and phases[attempts[-1]]["status"] != "completed":
        return attempts[-1]
    return phase if not attempts else f"{phase}{ATTEMPT_SEPARATOR}{len(attempts) + 1}"


def _with_phase(mechanisms: Sequence[Mechanism], entry: str) -> list[Mechanism]:
    for m in mechanisms:
        if not isinstance(m, (Mechanism, RdpCurve)):
            raise TypeError(f"expected Mechanism, got {type(m).__name__}")
    return [with_phase(m, entry) for m in mechanisms if m.steps > 0]


def _canonical(mechanisms: Sequence[Mechanism], entry: str) -> list[dict]:
    """Mechanisms with the same (sigma, q) merged into one, in order of first appearance: composition
    is commutative, and merging makes a phase's released list (DP mean, probe, then DP-SGD, per round)
    account exactly like its plan."""
    merged: dict[tuple[float, float], int] = {}
    curves: list[dict] = []  # RDP curves are kept one by one (each is one release)
    for m in _with_phase(mechanisms, entry):
        if isinstance(m, RdpCurve):
            curves.append(m.to_dict())
            continue
        key = (m.noise_multiplier, m.sample_rate)
        merged[key] = merged.get(key, 0) + m.steps
    return [*curves, *(Mechanism(sigma, q, steps, entry).to_dict() for (sigma, q), steps in merged.items())]


def _dominating(first: list[dict], second: list[dict], entry: str) -> list[dict]:
    """Per (sigma, q), the larger step count of two canonical lists (composition is monotone in steps)."""
    steps: dict[tuple[float, float], int] = {}
    # RDP curves: each is one release, so each list's curves add; the larger sum counts, order by order.
    sums = [_curve_sum(first), _curve_sum(second)]
    curves = {}
    if any(s is not None for s in sums):
        present = [s for s in sums if s is not None]
        labels = sorted({m["label"] for m in [*first, *second] if m.get("kind") == "rdp_curve"})
        curves[" + ".join(labels)] = [max(vals) for vals in zip(*present)]
    for m in [*first, *second]:
        if m.get("kind") == "rdp_curve":
            continue
        key = (float(m["noise_multiplier"]), float(m["sample_rate"]))
        steps[key] = max(steps.get(key, 0), int(m["steps"]))
    return [*(RdpCurve(tuple(rdp), label, entry).to_dict() for label, rdp in curves.items()),
            *(Mechanism(sigma, q, n, entry).to_dict() for (sigma, q), n in steps.items())]


def _curve_sum(mechanisms: list[dict]) -> list[float] | None:
    curves = [m["rdp"] for m in mechanisms if m.get("kind") == "rdp_curve"]
    return [sum(vals) for vals in zip(*curves)] if curves else None


def _as_mechanisms(name: str, entry: dict) -> list[Mechanism]:
    return [mechanism_from_dict({**m, "phase": name}) for m in entry["mechanisms"]]


def _entry_from_json(name: str, entry: dict) -> dict:
    """An entry as stored (format 2), or a format-1 entry (mechanisms and status only) upgraded."""
    out = {"phase": str(entry.get("phase", name.split(ATTEMPT_SEPARATOR)[0])),
           "attempt": int(entry.get("attempt", _attempt_number(name))),
           "status": str(entry["status"]),
           "mechanisms": [mechanism_from_dict(m).to_dict() for m in entry["mechanisms"]]}
    released = entry.get("released")
    if released is None:
        released = out["mechanisms"] if out["status"] == "completed" else []
    out["released"] = [mechanism_from_dict(m).to_dict() for m in released]
    for key in ("reservation", "planned_total_epsilon", "source", "output_at_step", "runs"):
        if key in entry:
            out[key] = entry[key]
    return out
