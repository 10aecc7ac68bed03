"""One privacy ledger per run tree: every phase that reads the private data records its mechanisms.

The total epsilon is the PRV composition of all recorded mechanisms (heterogeneous composition,
never a sum of per-phase epsilons). A phase's entry is replaced, not appended, when it is recorded
again, so re-running or resuming a phase never double-counts and never forgets. The file is
rewritten atomically (temp file, fsync, rename) and never reset.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

from dist_dpc.privacy.accounting import Mechanism, calibrate_noise_multiplier, compute_epsilon

STATUSES = ("planned", "running", "completed")


class PrivacyBudgetExceeded(RuntimeError):
    """Recording or starting this phase would push the total epsilon past the target."""


class PrivacyLedger:
    def __init__(self, path: str | Path, target_epsilon: float | None, delta: float, dataset_size: int,
                 accountant: str = "prv"):
        self.path = Path(path)
        self.target_epsilon, self.delta, self.dataset_size, self.accountant = target_epsilon, float(delta), int(dataset_size), accountant
        self._phases: dict[str, dict] = {}
        if self.path.is_file():
            data = json.loads(self.path.read_text())
            if abs(float(data["delta"]) - self.delta) > 1e-15 * max(1.0, self.delta) or int(data["dataset_size"]) != self.dataset_size:
                raise ValueError(
                    f"the privacy ledger {self.path} is bound to delta={data['delta']} and N={data['dataset_size']}, "
                    f"this run has delta={self.delta} and N={self.dataset_size}: a ledger covers one data set and one "
                    "delta; start a new run tree for other data")
            self._phases = {name: entry for name, entry in data["phases"].items()}

    def record(self, phase: str, mechanisms: Sequence[Mechanism], status: str = "running") -> None:
        if status not in STATUSES:
            raise ValueError(f"status {status!r} must be one of {STATUSES}")
        self._phases[phase] = {"mechanisms": [m.to_dict() for m in mechanisms if m.steps > 0], "status": status}
        self._write()

    def mechanisms(self, exclude_phase: str | None = None) -> list[Mechanism]:
        return [Mechanism.from_dict(m) for name, entry in self._phases.items() if name != exclude_phase
                for m in entry["mechanisms"]]

    def phases(self) -> dict[str, dict]:
        return json.loads(json.dumps(self._phases))

    def total_epsilon(self, accountant: str | None = None) -> float:
        return compute_epsilon(self.mechanisms(), self.delta, accountant or self.accountant)

    def check_planned(self, phase: str, planned: Sequence[Mechanism]) -> float:
        """Epsilon of everything else plus ``planned`` for this phase; refuses if over the target."""
        total = compute_epsilon(self.mechanisms(exclude_phase=phase) + list(planned), self.delta, self.accountant)
        if self.target_epsilon is not None and total > self.target_epsilon * (1 + 1e-6):
            raise PrivacyBudgetExceeded(
                f"phase {phase!r} would bring the run's total epsilon to {total:.3f} > privacy.target_epsilon="
                f"{self.target_epsilon} (already spent by other phases: {self.total_epsilon_excluding(phase):.3f}); "
                "raise the noise, train fewer steps/epochs, raise privacy.target_epsilon or give this phase a "
                "larger share of the budget")
        return total

    def total_epsilon_excluding(self, phase: str) -> float:
        return compute_epsilon(self.mechanisms(exclude_phase=phase), self.delta, self.accountant)

    def calibrate_phase(self, phase: str, sample_rate: float, steps: int, cumulative_target: float) -> float:
        """Sigma such that (other phases + this phase's (sigma, q, steps)) reaches ``cumulative_target``."""
        return calibrate_noise_multiplier(cumulative_target, self.delta, sample_rate, steps, self.accountant,
                                          prior=tuple(self.mechanisms(exclude_phase=phase)))

    def to_dict(self) -> dict:
        return {"target_epsilon": self.target_epsilon, "delta": self.delta, "dataset_size": self.dataset_size,
                "accountant": self.accountant, "phases": self.phases(),
                "total_epsilon_prv": self.total_epsilon("prv"), "total_epsilon_rdp": self.total_epsilon("rdp")}

    def _write(self) -> None:
        data = {"target_epsilon": self.target_epsilon, "delta": self.delta, "dataset_size": self.dataset_size,
                "accountant": self.accountant, "phases": self._phases}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
        with tmp.open("w") as fh:
            json.dump(data, fh, indent=2)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)
