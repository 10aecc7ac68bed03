"""One privacy ledger per run tree: every phase that reads the private data records its mechanisms.

The total epsilon is the composition of all recorded mechanisms by opacus' PRV accountant
(heterogeneous composition, never a sum of per-phase epsilons). A phase's entry is *replaced*, not
appended, when it is recorded again, so re-running or resuming a phase never double-counts and
never forgets. The ledger is bound to one data set (N) and one delta; it is never reset.

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
from typing import Iterator, Sequence

from dist_dpc.privacy.accounting import (Mechanism, _check_accountant, _check_dataset_size, _check_delta,
                                         calibrate_noise_multiplier, compute_epsilon)

try:  # POSIX; elsewhere writers are not serialised across processes
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None

STATUSES = ("planned", "running", "completed")
FORMAT_VERSION = 1
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
            stored_delta, stored_n = float(data["delta"]), int(data["dataset_size"])
            phases = {str(name): {"mechanisms": [Mechanism.from_dict(m).to_dict() for m in entry["mechanisms"]],
                                  "status": str(entry["status"])}
                      for name, entry in data["phases"].items()}
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
        return [Mechanism.from_dict({**m, "phase": name}) for name, entry in self._phases.items()
                if name != exclude_phase for m in entry["mechanisms"]]

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
        """Set ``phase``'s mechanisms (replacing any earlier entry for it) and status, durably."""
        if not isinstance(phase, str) or not phase:
            raise ValueError(f"phase={phase!r} must be a non-empty string")
        if status not in STATUSES:
            raise ValueError(f"status={status!r} must be one of {', '.join(STATUSES)}")
        entry = {"mechanisms": [Mechanism(m.noise_multiplier, m.sample_rate, m.steps, phase).to_dict()
                                for m in mechanisms if m.steps > 0],
                 "status": status}
        with self._lock():
            phases = self._read()
            phases = dict(self._phases if phases is None else phases)
            phases[phase] = entry  # an existing phase keeps its position
            self._write(phases)
            self._phases = phases

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
        data = {"version": FORMAT_VERSION, "target_epsilon": self.target_epsilon, "delta": self.delta,
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
        """Epsilon of (all other phases' mechanisms + ``planned`` for ``phase``); raises
        PrivacyBudgetExceeded if that exceeds target_epsilon."""
        others = self.mechanisms(exclude_phase=phase)
        total = compute_epsilon(others + list(planned), self.delta, self.accountant)
        if self.target_epsilon is not None and total > self.target_epsilon * (1 + RELATIVE_SLACK):
            spent = compute_epsilon(others, self.delta, self.accountant)
            raise PrivacyBudgetExceeded(
                f"phase {phase!r} would bring the run's total epsilon to {total:.4g} (composition of all phases, "
                f"delta={self.delta:.3g}, {self.accountant}) > privacy.target_epsilon={self.target_epsilon:g}; "
                f"the other phases already spend {spent:.4g}. Raise the noise (privacy.noise_multiplier), train "
                "fewer steps/epochs, use a larger privacy.target_epsilon, or a different split of the budget "
                "between phases")
        return total

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
