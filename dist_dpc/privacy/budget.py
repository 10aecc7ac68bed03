"""A spending phase's account in the run tree's ledger: the one object every private release goes through.

    budget = PhaseBudget.reserve(ledger, "teacher", sample_rate=q, steps=T, fixed=(dp_mean,), target_epsilon=2.0)
    ... compute the DP mean ...;  budget.release(dp_mean)          # before the mean is written anywhere
    ... DP-SGD with prior=budget.prior() ...; budget.release(budget.dp_sgd(T))
    budget.complete()

``reserve`` calibrates sigma (or checks a given one) against everything the ledger holds and records
the plan under the ledger's lock (PrivacyLedger.reserve): concurrent phases cannot overspend, a
resumed attempt keeps its sigma, a re-run after completion is a new attempt that composes with the
old one. Nothing here adds mechanisms up by hand; the ledger composes.

Several ranks: one rank writes (``writer=True``, rank 0); the others ``join`` the reservation it
made (after a barrier) and their ``release``/``complete`` calls do nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from dist_dpc.privacy.accounting import Mechanism, calibrate_noise_multiplier, compute_epsilon
from dist_dpc.privacy.ledger import RELATIVE_SLACK, PrivacyBudgetExceeded, PrivacyLedger


@dataclass
class PhaseBudget:
    ledger: PrivacyLedger
    entry: str                 # the ledger entry of this attempt (``phase``, ``phase#2``, ...)
    phase: str
    noise_multiplier: float    # sigma of the phase's DP-SGD steps
    sample_rate: float
    steps: int                 # planned DP-SGD steps (probe and fine-tuning together)
    writer: bool = True

    @property
    def attempt(self) -> int:
        return int(self.ledger.entry(self.entry).get("attempt", 1))

    @classmethod
    def reserve(cls, ledger: PrivacyLedger, phase: str, *, sample_rate: float, steps: int,
                fixed: Sequence[Mechanism] = (), target_epsilon: float | None = None,
                noise_multiplier: float | None = None, expected_batch_size: float | None = None,
                max_effective_noise: float | None = None, fresh: bool = False) -> "PhaseBudget":
        """Reserve ``fixed`` (mechanisms of a set sigma, e.g. a DP mean) plus ``steps`` DP-SGD steps at
        ``sample_rate``, with sigma calibrated so that the run's composition stays within
        ``target_epsilon`` (a cumulative target: the phase's share and all before it), or the given
        ``noise_multiplier`` checked against it. A resumed attempt keeps the sigma it reserved.
        ``fresh``: refuse, under the ledger's lock, when ``phase``'s latest attempt is still running (a
        caller that cannot resume it -- no checkpoint ties it to that attempt -- must not share its entry:
        the entry would count one plan for two runs)."""
        fixed = tuple(fixed)
        chosen: dict = {}

        def plan(others: list[Mechanism], previous: dict | None) -> list[Mechanism]:
            if fresh and previous is not None:
                raise ValueError(f"ledger {ledger.path}: entry {phase!r} is still running (a run that did not call "
                                 "finish(), killed, or running now); its whole plan stays counted. Call finish() in "
                                 f"that run, or start this one under another name (e.g. name='{phase}-2')")
            same_plan = previous is not None and previous.get("sample_rate") == sample_rate \
                and previous.get("steps") == steps and previous.get("fixed") == [m.to_dict() for m in fixed]
            if noise_multiplier is not None:
                sigma = float(noise_multiplier)
            elif same_plan:
                sigma = float(previous["noise_multiplier"])  # resumed: the checkpoint was made with this sigma
            else:
                _check_fixed_fits(ledger, phase, target_epsilon, others, fixed)
                sigma = _calibrate(ledger, phase, target_epsilon, sample_rate, steps, [*others, *fixed])
            if max_effective_noise is not None and expected_batch_size:
                _check_effective_noise(ledger, phase, sigma, sample_rate, steps, expected_batch_size,
                                       max_effective_noise, [*others, *fixed])
            planned = [*fixed, Mechanism(sigma, sample_rate, steps, phase)]
            if target_epsilon is not None:
                total = compute_epsilon(others + planned, ledger.delta, ledger.accountant)
                if total > target_epsilon * (1 + RELATIVE_SLACK):
                    raise PrivacyBudgetExceeded(
                        f"phase {phase!r} would bring the run's total epsilon to {total:.4g} > {target_epsilon:.4g}, "
                        f"its cumulative target (privacy.target_epsilon={ledger.target_epsilon:g} times the shares of "
                        f"pipeline.budget_split up to it), with noise_multiplier={sigma:.4g} for {steps} steps at "
                        f"q={sample_rate:.4g}: raise privacy.noise_multiplier, train fewer steps, or leave "
                        "noise_multiplier unset to calibrate it")
            chosen["sigma"] = sigma
            return planned

        def reservation() -> dict:
            return {"noise_multiplier": chosen["sigma"], "sample_rate": sample_rate, "steps": steps,
                    "fixed": [m.to_dict() for m in fixed]}

        entry = ledger.reserve(phase, plan, reservation)
        return cls(ledger, entry, phase, chosen["sigma"], sample_rate, steps)

    @classmethod
    def join(cls, ledger: PrivacyLedger, phase: str, entry: str | None = None) -> "PhaseBudget":
        """The reservation the writing rank made for ``phase`` (read after a barrier); never writes.
        ``entry``: the entry the writing rank reserved (sent to the other ranks), else the latest."""
        entry = entry or ledger.latest_attempt(phase)
        if entry is None:
            raise RuntimeError(f"phase {phase!r} has no reservation in {ledger.path}: the writing rank reserves "
                               "it before the others join")
        r = ledger.entry(entry).get("reservation") or {}
        return cls(ledger, entry, phase, float(r["noise_multiplier"]), float(r["sample_rate"]), int(r["steps"]),
                   writer=False)

    def dp_sgd(self, steps: int) -> Mechanism:
        """``steps`` DP-SGD steps at this phase's sigma and q (a probe's or a fine-tuning's)."""
        return Mechanism(self.noise_multiplier, self.sample_rate, steps, self.entry)

    def release(self, *mechanisms: Mechanism) -> None:
        """Record mechanisms as they are released: call it before their result is written anywhere."""
        if self.writer:
            self.ledger.release(self.entry, mechanisms)

    def released(self) -> list[Mechanism]:
        return self.ledger.released(self.entry)

    def prior(self) -> tuple[Mechanism, ...]:
        """What the next release of this phase composes with (other entries, then this one's releases)."""
        return tuple(self.ledger.prior(self.entry))

    def complete(self) -> list[Mechanism]:
        """This attempt now counts what it released; returns those mechanisms."""
        if self.writer:
            return self.ledger.complete(self.entry)
        return self.ledger.released(self.entry)

    def epsilon(self) -> float:
        """The run tree's total epsilon now (the ledger's composition)."""
        return self.ledger.total_epsilon()


def _check_fixed_fits(ledger: PrivacyLedger, phase: str, target: float | None, others: list[Mechanism],
                      fixed: tuple[Mechanism, ...]) -> None:
    """A target the phase's set-noise mechanisms (head_init's DP mean) already exceed, alone or with
    what the tree spent before, is refused with what each part costs (not as "earlier phases")."""
    if target is None or not fixed:
        return
    before = compute_epsilon(others, ledger.delta, ledger.accountant)
    with_fixed = compute_epsilon([*others, *fixed], ledger.delta, ledger.accountant)
    if with_fixed < target or before >= target:
        return  # fits; or the earlier phases alone are over it, which calibration says as such
    raise ValueError(
        f"privacy.target_epsilon={target:g} is unreachable for phase {phase!r}: the smallest epsilon this run "
        f"allows is above {with_fixed:.4g} (at delta={ledger.delta:.3g}): the mechanisms of a set noise that the "
        f"phase runs first (head_init's DP mean, sigma {', '.join(f'{m.noise_multiplier:g}' for m in fixed)}) "
        f"spend that much" + (f" with what the tree spent before ({before:.4g})" if others else "")
        + ". Use a larger target_epsilon, raise head_init.mean_noise_multiplier, or set head_init.centre_pooler=false")


def _check_effective_noise(ledger: PrivacyLedger, phase: str, sigma: float, q: float, steps: int, batch: float,
                           limit: float, prior: list[Mechanism]) -> None:
    """Refused before anything is recorded: noise sigma/B per coordinate of the averaged gradient
    above ``limit`` means the data set is too small for this epsilon at this batch."""
    if sigma / batch <= limit:
        return
    floor = compute_epsilon([*prior, Mechanism(limit * batch, q, steps, phase)], ledger.delta, ledger.accountant)
    raise ValueError(
        f"phase {phase!r}: the training set (N={round(batch / q)}) is too small for this privacy budget at "
        f"train.batch_size={batch:g}: it needs noise_multiplier={sigma:.4g} for {steps} steps, i.e. noise of "
        f"{sigma / batch:.3g} x max_grad_norm on each coordinate of every averaged gradient, above "
        f"privacy.max_effective_noise={limit:g}, where DP fine-tuning learns nothing. The smallest epsilon this data "
        f"size allows for {steps} steps at that limit is {floor:.3g} (the whole run tree, delta={ledger.delta:.3g}). "
        "Raise privacy.target_epsilon to at least that, use a larger train.batch_size (more examples per step), "
        "train fewer steps, use more data, or set privacy.max_effective_noise=null to train anyway")


def _calibrate(ledger: PrivacyLedger, phase: str, target: float | None, q: float, steps: int,
               prior: list[Mechanism]) -> float:
    if target is None:
        raise ValueError(f"phase {phase!r}: set privacy.target_epsilon (sigma is then calibrated) or "
                         "privacy.noise_multiplier")
    if ledger.target_epsilon is not None and target > ledger.target_epsilon * (1 + RELATIVE_SLACK):
        raise ValueError(f"phase {phase!r}: cumulative target epsilon {target:g} exceeds the run's "
                         f"privacy.target_epsilon={ledger.target_epsilon:g}")
    try:
        return calibrate_noise_multiplier(target, ledger.delta, q, steps, ledger.accountant, prior=prior)
    except ValueError as err:
        raise ValueError(f"phase {phase!r}: {err}") from err


__all__ = ["PhaseBudget", "PrivacyBudgetExceeded"]
