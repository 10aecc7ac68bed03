"""Privacy accounting over opacus' accountants: composition, calibration, a live per-phase accountant.

Every epsilon here is the composition of a list of Poisson-subsampled Gaussian mechanisms
``(sigma, q, steps)``, computed by opacus' PRV accountant (default) or its RDP accountant from the
whole history ``[(sigma, q, steps), ...]``: heterogeneous composition, never a sum of epsilons.

Speed. Calibration and step searches evaluate epsilon many times, so:

* results are memoised on the hashable history (``functools.lru_cache``);
* opacus' PRV accountant sizes its discretisation domain with an RDP bound that it recomputes from
  scratch on every call (0.1-0.2 s per distinct mechanism, from the fractional RDP orders), and
  composes by FFT on a grid whose length often has a large prime factor (5-10x slower FFTs).
  ``_PRVAccountant`` is opacus' ``PRVAccountant`` with ``_get_domain`` changed (the same domain
  bound, from memoised per-step RDP vectors; the grid widened symmetrically to the next FFT-friendly
  length) and a round-off check added to ``get_epsilon`` (below). Discretisation, composition and
  the epsilon bound are opacus' own; the result agrees with a stock ``PRVAccountant`` to ~1e-7
  relative or better (the tests drive one step by step);
* calibration starts from a Gaussian-DP (CLT) estimate and corrects it with a few PRV evaluations,
  instead of bisecting from scratch.

PRV in extreme regimes. opacus discretises the privacy-loss distribution on a grid of about
``2 L sqrt(T ln(12/delta_error) / 2) / eps_error`` points (T = total steps, L = domain half-width),
so with ``eps_error = 0.01`` it needs tens of millions of points (minutes, gigabytes) for ~10^5+
steps or very large epsilons. We therefore

* keep opacus' default ``eps_error = 0.01`` while the grid stays under ``PRV_MAX_POINTS`` and
  otherwise widen ``eps_error`` just enough to fit (the PRV result is an *upper* bound that already
  includes ``eps_error``, so this loosens it slightly and never breaks the guarantee);
* for epsilons whose RDP bound exceeds ``PRV_EPSILON_CUTOFF`` (no meaningful guarantee; PRV returns
  ``inf`` there), whenever PRV raises or returns a non-finite number, and when the FFT round-off in
  the composed distribution exceeds opacus' ``delta_error`` budget (tiny deltas, e.g. 1e-12 with
  10^5 steps, where PRV's epsilon is numerical noise), report the RDP bound instead and say so with
  an :class:`AccountingWarning`. RDP is a valid (looser) upper bound, so the reported epsilon is
  still a guarantee; it is never silently substituted.
"""

from __future__ import annotations

import functools
import math
import numbers
import warnings
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

ACCOUNTANTS = ("prv", "rdp")

MIN_SIGMA = 0.1        # calibration never returns less noise than this (degenerate budgets)
MAX_SIGMA = 1000.0     # ... nor more: a target needing more noise is reported as unreachable
MAX_STEPS = 10**8      # max_steps_within_budget stops counting here
PRV_EPS_ERROR = 0.01   # opacus' default discretisation error of the PRV epsilon (absolute)
PRV_MAX_POINTS = 2**21  # largest PRV grid (~2.5 s, ~0.2 GB); beyond it eps_error is widened
PRV_EPSILON_CUTOFF = 100.0  # above this (RDP) epsilon, the RDP bound is reported instead of PRV


class AccountingWarning(UserWarning):
    """An epsilon was computed with a different method than the one asked for (always an upper bound)."""


Key = tuple  # ((sigma, q, steps), ...) with consecutive identical (sigma, q) merged


@dataclass(frozen=True)
class Mechanism:
    """One Poisson-subsampled Gaussian mechanism applied ``steps`` times."""

    noise_multiplier: float
    sample_rate: float
    steps: int
    phase: str = ""  # which pipeline phase spent it (teacher, distill, ...)

    def __post_init__(self):
        sigma, q, steps = self.noise_multiplier, self.sample_rate, self.steps
        if isinstance(sigma, bool) or not isinstance(sigma, numbers.Real) or not math.isfinite(sigma) or sigma < 0:
            raise ValueError(f"noise_multiplier={sigma!r} must be a finite number >= 0")
        if isinstance(q, bool) or not isinstance(q, numbers.Real) or not 0 < q <= 1:
            raise ValueError(f"sample_rate={q!r} must be in (0, 1] (expected batch size / dataset size)")
        if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 0:
            raise ValueError(f"steps={steps!r} must be an integer >= 0")
        # Plain Python types: hashable the same way, JSON-serialisable, no numpy scalars in caches.
        object.__setattr__(self, "noise_multiplier", float(sigma))
        object.__setattr__(self, "sample_rate", float(q))
        object.__setattr__(self, "steps", int(steps))
        object.__setattr__(self, "phase", str(self.phase))

    def to_dict(self) -> dict:
        return {"noise_multiplier": self.noise_multiplier, "sample_rate": self.sample_rate,
                "steps": self.steps, "phase": self.phase}

    @classmethod
    def from_dict(cls, d: dict) -> "Mechanism":
        return cls(float(d["noise_multiplier"]), float(d["sample_rate"]), int(d["steps"]), str(d.get("phase", "")))


@dataclass(frozen=True)
class RdpCurve:
    """A mechanism known by its Renyi-DP curve only: epsilon(alpha) at every order of ``rdp_orders()``.
    Private hyper-parameter selection (dist_dpc.privacy.selection) has no PRV; a ledger that holds one
    is composed by RDP (curves add order by order), which is a valid upper bound for everything in it."""

    rdp: tuple
    label: str
    phase: str = ""
    steps: int = 1  # one release (report and truncation count it as one step)

    def __post_init__(self):
        rdp = tuple(float(v) for v in self.rdp)
        if len(rdp) != len(rdp_orders()) or any(not v >= 0 for v in rdp):
            raise ValueError(f"RdpCurve {self.label!r}: needs {len(rdp_orders())} values >= 0 (one per order of "
                             f"rdp_orders()), got {len(rdp)}")
        object.__setattr__(self, "rdp", rdp)
        object.__setattr__(self, "label", str(self.label))
        object.__setattr__(self, "phase", str(self.phase))
        object.__setattr__(self, "steps", 1)

    def to_dict(self) -> dict:
        return {"kind": "rdp_curve", "label": self.label, "orders": list(rdp_orders()), "rdp": list(self.rdp),
                "phase": self.phase}

    @classmethod
    def from_dict(cls, d: dict) -> "RdpCurve":
        if [float(a) for a in d.get("orders", [])] != [float(a) for a in rdp_orders()]:
            raise ValueError(f"RdpCurve {d.get('label')!r} was recorded at other RDP orders than this version's "
                             "rdp_orders(): it cannot be composed exactly; use the dist-dpc version that wrote it")
        return cls(tuple(d["rdp"]), str(d.get("label", "")), str(d.get("phase", "")))


def mechanism_from_dict(d: dict) -> "Mechanism | RdpCurve":
    """A ledger / lineage record -> its mechanism (a subsampled Gaussian, or an RDP curve)."""
    return RdpCurve.from_dict(d) if d.get("kind") == "rdp_curve" else Mechanism.from_dict(d)


def with_phase(m: "Mechanism | RdpCurve", phase: str) -> "Mechanism | RdpCurve":
    if isinstance(m, RdpCurve):
        return RdpCurve(m.rdp, m.label, phase)
    return Mechanism(m.noise_multiplier, m.sample_rate, m.steps, phase)


# -- validation -------------------------------------------------------------------------------------

def _check_accountant(accountant: str) -> None:
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"privacy.accountant={accountant!r} is invalid: allowed values are {', '.join(ACCOUNTANTS)}")


def _check_delta(delta: float) -> None:
    if isinstance(delta, bool) or not isinstance(delta, numbers.Real) or not 0 < delta < 1:
        raise ValueError(f"privacy.delta={delta!r} must be in (0, 1)")


def _check_sample_rate(sample_rate: float) -> None:
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, numbers.Real) or not 0 < sample_rate <= 1:
        raise ValueError(f"sample_rate={sample_rate!r} must be in (0, 1] (expected batch size / dataset size)")


def _check_target(target_epsilon: float) -> None:
    if (target_epsilon is None or isinstance(target_epsilon, bool) or not isinstance(target_epsilon, numbers.Real)
            or not 0 < target_epsilon < math.inf):
        raise ValueError(f"privacy.target_epsilon={target_epsilon!r} must be a finite number > 0")


def _key(mechanisms: Sequence[Mechanism]) -> Key | None:
    """The accountant history: steps == 0 dropped, consecutive identical (sigma, q) merged (exactly
    what opacus' ``step()`` does when driven step by step). None if some mechanism has no noise."""
    merged: list[list] = []
    for m in mechanisms:
        if isinstance(m, RdpCurve):
            continue  # composed by _epsilon, beside the history
        if not isinstance(m, Mechanism):
            raise TypeError(f"expected Mechanism, got {type(m).__name__}")
        if m.steps == 0:
            continue
        if m.noise_multiplier == 0:
            return None
        if merged and merged[-1][0] == m.noise_multiplier and merged[-1][1] == m.sample_rate:
            merged[-1][2] += m.steps
        else:
            merged.append([m.noise_multiplier, m.sample_rate, m.steps])
    return tuple(tuple(h) for h in merged)


# -- RDP, memoised per (q, sigma) -------------------------------------------------------------------

def _alphas() -> list:
    from opacus.accountants import RDPAccountant

    return RDPAccountant.DEFAULT_ALPHAS


def rdp_orders() -> tuple:
    """The Renyi orders every RDP curve of dist-dpc is given at (opacus' default orders)."""
    return tuple(float(a) for a in _alphas())


def rdp_of(mechanisms: Sequence["Mechanism | RdpCurve"]) -> np.ndarray:
    """The RDP curve (at ``rdp_orders()``) of the composition of ``mechanisms``: curves add."""
    total = np.zeros(len(_alphas()))
    for m in mechanisms:
        if isinstance(m, RdpCurve):
            total = total + np.asarray(m.rdp)
        elif m.steps:
            total = total + (_rdp_per_step(m.sample_rate, m.noise_multiplier) * m.steps
                             if m.noise_multiplier > 0 else np.inf)
    return total


def epsilon_from_rdp(rdp: np.ndarray, delta: float) -> float:
    """(epsilon, delta)-DP from an RDP curve at ``rdp_orders()`` (opacus' conversion)."""
    from opacus.accountants.analysis import rdp as rdp_analysis

    if not np.all(np.isfinite(rdp)):
        return math.inf
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # optimal order at the end of the grid: still a bound
        eps, _ = rdp_analysis.get_privacy_spent(orders=_alphas(), rdp=np.asarray(rdp), delta=delta)
    return float(eps)


@functools.lru_cache(maxsize=4096)
def _rdp_per_step(sample_rate: float, noise_multiplier: float) -> np.ndarray:
    from opacus.accountants.analysis import rdp as rdp_analysis

    vec = rdp_analysis.compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=1, orders=_alphas())
    vec.flags.writeable = False
    return vec


def _rdp_epsilon(history: Key, delta: float) -> float:
    """opacus ``RDPAccountant(history).get_epsilon(delta)``, same arithmetic, memoised RDP vectors."""
    from opacus.accountants.analysis import rdp as rdp_analysis

    rdp = sum([_rdp_per_step(q, sigma) * steps for sigma, q, steps in history])
    with warnings.catch_warnings():
        # "Optimal order is the largest/smallest alpha": the bound is loose there, still valid.
        warnings.simplefilter("ignore", UserWarning)
        eps, _ = rdp_analysis.get_privacy_spent(orders=_alphas(), rdp=rdp, delta=delta)
    return float(eps)


# -- PRV ----------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=4096)
def _prv_domain_half_width(history: Key, eps_error: float, delta_error: float) -> float:
    """opacus ``compute_safe_domain_size`` (remark 5.6 of Gopi et al.), from memoised RDP vectors."""
    total = sum(steps for _, _, steps in history)
    half_width = _rdp_epsilon(history, delta_error / 4)
    for sigma, q, _ in history:
        half_width = max(half_width, _rdp_epsilon(((sigma, q, 1),), delta_error / (8 * total)))
    return max(half_width, eps_error) + 3


def _prv_grid_points(history: Key, eps_error: float, delta_error: float) -> float:
    total = sum(steps for _, _, steps in history)
    mesh = eps_error / math.sqrt(total * math.log(12 / delta_error) / 2)
    return 2 * _prv_domain_half_width(history, eps_error, delta_error) / mesh


def _fast_even_length(n: int) -> int:
    from scipy.fft import next_fast_len

    m = next_fast_len(n, real=True)
    while m % 2:
        m = next_fast_len(m + 1, real=True)
    return m


@functools.lru_cache(maxsize=1)
def _prv_accountant_class():
    from opacus.accountants import PRVAccountant
    from opacus.accountants.analysis.prv import Domain

    class _PRVAccountant(PRVAccountant):
        """opacus' PRV accountant: domain from memoised RDP vectors, FFT-friendly grid, round-off check."""

        def _get_domain(self, prvs, num_self_compositions, eps_error, delta_error):
            history = tuple((float(p.noise_multiplier), float(p.sample_rate), int(n))
                            for p, n in zip(prvs, num_self_compositions))
            half_width = _prv_domain_half_width(history, float(eps_error), float(delta_error))
            # Same mesh and domain as opacus' PRVAccountant._get_domain ...
            mesh_size = eps_error / np.sqrt(sum(num_self_compositions) * np.log(12 / delta_error) / 2)
            domain = Domain.create_aligned(-half_width, half_width, mesh_size)
            # ... widened symmetrically (same mesh) to an FFT-friendly even length: a grid length with
            # a large prime factor makes opacus' FFT composition 5-10x slower. A wider truncation
            # domain is always safe (the safe size is a lower bound); epsilon moves by ~1e-8 relative.
            want = _fast_even_length(domain.size)
            pad = (want - domain.size) // 2
            while domain.size < want:
                domain = Domain.create_aligned(-half_width - pad * mesh_size, half_width + pad * mesh_size, mesh_size)
                pad += 1
            return domain

        def get_epsilon(self, delta, *, eps_error=PRV_EPS_ERROR, delta_error=None, **kwargs):
            # opacus' PRVAccountant.get_epsilon, plus a round-off check: the FFT composition leaves
            # noise of about 1e-16 per grid point everywhere, tails included. The epsilon bound
            # assumes tail masses accurate to delta_error; the composed pmf's negative entries (the
            # true pmf is >= 0) measure that noise, and past delta_error the result is noise
            # (seen for delta <= 1e-10: epsilon jumping by 2x between sigmas 1e-7 apart).
            if delta_error is None:
                delta_error = delta / 1000
            dprv = self._get_dprv(eps_error=eps_error, delta_error=delta_error)
            round_off = -2 * float(dprv.pmf[dprv.pmf < 0].sum())
            if round_off > delta_error:
                raise FloatingPointError(
                    f"floating-point round-off in the composed privacy-loss distribution (~{round_off:.1e}) "
                    f"exceeds delta_error={delta_error:.1e}; delta={delta:.3g} is too small for PRV at this grid "
                    f"size ({dprv.domain.size} points)")
            _, _, eps_upper = dprv.compute_epsilon(delta, delta_error, eps_error)
            return eps_upper

    return _PRVAccountant


def _prv_eps_error(history: Key, delta: float) -> float:
    """The ``eps_error`` given to opacus: its default 0.01, widened only as far as needed to keep
    the discretisation grid under ``PRV_MAX_POINTS`` (very many steps or very large epsilons)."""
    delta_error = delta / 1000  # opacus' default
    points = _prv_grid_points(history, PRV_EPS_ERROR, delta_error)
    return PRV_EPS_ERROR if points <= PRV_MAX_POINTS else PRV_EPS_ERROR * points / PRV_MAX_POINTS


@functools.lru_cache(maxsize=8192)
def _compose(history: Key, delta: float, accountant: str) -> tuple[float, str | None]:
    """(epsilon, note): note explains why an RDP bound stands in for the PRV value (else None)."""
    if accountant == "rdp":
        return _rdp_epsilon(history, delta), None
    rdp = _rdp_epsilon(history, delta)
    where = f"history [(sigma, q, steps)] = {list(history)}, delta={delta:.3g}"
    if rdp > PRV_EPSILON_CUTOFF:
        return rdp, (f"PRV accountant not used: the RDP epsilon {rdp:.4g} exceeds {PRV_EPSILON_CUTOFF:g} "
                     f"(PRV's discretisation breaks down there); reporting the RDP upper bound instead ({where})")
    try:
        eps_error = _prv_eps_error(history, delta)
        acc = _prv_accountant_class()()
        acc.history = [tuple(h) for h in history]
        with np.errstate(all="ignore"):
            eps = float(acc.get_epsilon(delta=delta, eps_error=eps_error))
        failure = None if math.isfinite(eps) else f"it returned {eps}"
    except (ArithmeticError, RuntimeError, ValueError, MemoryError) as err:
        failure = f"it raised {type(err).__name__}: {err}"
    if failure is None:
        return eps, None
    return rdp, (f"PRV accountant failed ({failure}); reporting the RDP upper bound {rdp:.4g} instead ({where})")


PROFILE_DELTA_ERROR = 1e-9  # absolute slack on every delta of privacy_profile (opacus' delta_error)


def privacy_profile(mechanisms: Sequence[Mechanism], epsilons) -> np.ndarray:
    """Upper bounds on delta(epsilon), the privacy profile of the composition of ``mechanisms``, at
    each epsilon of ``epsilons``: the composition is (epsilon, delta(epsilon))-DP for all of them at
    once, which is its trade-off curve (Dong, Roth & Su, Prop. 2.12). The same PRV composition as the
    ledger's epsilon (opacus, our domain); opacus' error bounds are applied as in its
    ``compute_epsilon``: delta(eps) <= estimate(eps - eps_error) + delta_error.

    The privacy audit's f-DP test reads the whole curve, not one (epsilon, delta) point. A
    mechanism without noise gives 1 everywhere (no guarantee); no mechanism gives 0."""
    epsilons = np.asarray(epsilons, dtype=np.float64)
    if any(isinstance(m, RdpCurve) for m in mechanisms):
        raise ValueError("privacy_profile needs (sigma, q, steps) mechanisms: an RDP-only curve has no PRV")
    key = _key(mechanisms)
    if key is None:
        return np.ones_like(epsilons)
    if not key:
        return np.zeros_like(epsilons)
    dprv, eps_error = _composed_prv(key)
    ts, pmf = np.asarray(dprv.domain.ts, dtype=np.float64), np.asarray(dprv.pmf, dtype=np.float64)
    # delta(eps) = sum_{t >= eps} p(t) (1 - e^{eps - t}): two suffix sums give every eps at once.
    shifted = epsilons - eps_error  # below 0 too: the hockey-stick formula holds there
    mass = np.append(np.cumsum(pmf[::-1])[::-1], 0.0)
    # Only losses t >= min(shifted) are ever summed: below, e^-t may overflow and is never needed.
    used = ts >= (shifted.min() if shifted.size else 0.0)
    weighted = np.append(np.cumsum(np.where(used, pmf * np.exp(-np.where(used, ts, 0.0)), 0.0)[::-1])[::-1], 0.0)
    first = np.searchsorted(ts, shifted, side="left")
    estimate = mass[first] - np.exp(shifted) * weighted[first]
    return np.clip(estimate + PROFILE_DELTA_ERROR, 0.0, 1.0)


@functools.lru_cache(maxsize=64)
def _composed_prv(history: Key):
    """(opacus' composed discrete PRV, its eps_error) for ``history``: the one place that reads
    opacus' ``PRVAccountant._get_dprv`` (private; tests/privacy/test_profile.py fails if it moves)."""
    eps_error = _prv_eps_error(history, PROFILE_DELTA_ERROR * 1000)
    acc = _prv_accountant_class()()
    acc.history = [tuple(h) for h in history]
    with np.errstate(all="ignore"):
        dprv = acc._get_dprv(eps_error=eps_error, delta_error=PROFILE_DELTA_ERROR)
    round_off = -2 * float(np.asarray(dprv.pmf)[np.asarray(dprv.pmf) < 0].sum())
    if round_off > PROFILE_DELTA_ERROR:
        raise FloatingPointError(f"floating-point round-off in the composed privacy-loss distribution (~{round_off:.1e}) "
                                 f"exceeds {PROFILE_DELTA_ERROR:.0e}: the privacy profile of {list(history)} is not reliable")
    return dprv, eps_error


def _epsilon(mechanisms: Sequence[Mechanism], delta: float, accountant: str) -> tuple[float, str | None]:
    _check_accountant(accountant)
    _check_delta(delta)
    if any(isinstance(m, RdpCurve) for m in mechanisms):
        # A mechanism known only by its RDP curve: the whole composition by RDP (valid, looser than PRV).
        return epsilon_from_rdp(rdp_of(mechanisms), float(delta)), None
    key = _key(mechanisms)
    if key is None:
        return math.inf, None
    if not key:
        return 0.0, None
    return _compose(key, float(delta), accountant)


def compute_epsilon(mechanisms: Sequence[Mechanism], delta: float, accountant: str = "prv") -> float:
    """Epsilon of the composition of all ``mechanisms`` at ``delta`` (heterogeneous composition by
    opacus' PRV or RDP accountant). Mechanisms with ``steps == 0`` are ignored; none -> 0.0; a
    mechanism with ``noise_multiplier == 0`` and steps > 0 -> inf."""
    eps, note = _epsilon(mechanisms, delta, accountant)
    if note:
        warnings.warn(note, AccountingWarning, stacklevel=2)
    return eps


# -- calibration --------------------------------------------------------------------------------------

def _gdp_mu(sigma: float, q: float, steps: int) -> float:
    """CLT (Gaussian-DP) approximation of a subsampled Gaussian mechanism (Bu et al. 2020)."""
    return q * math.sqrt(steps * math.expm1(min(1.0 / sigma**2, 700.0)))


def _gdp_epsilon(mu: float, delta: float) -> float:
    """epsilon of mu-GDP at delta: delta(eps) = Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2)."""
    from scipy.optimize import brentq
    from scipy.special import log_ndtr, ndtr

    def excess(eps):
        return ndtr(-eps / mu + mu / 2) - math.exp(eps + log_ndtr(-eps / mu - mu / 2)) - delta

    if not math.isfinite(mu) or mu <= 0 or excess(0.0) <= 0:
        return 0.0
    high = 1.0
    while excess(high) > 0:
        high *= 2
        if high > 1e6:
            return math.inf
    return brentq(excess, 0.0, high, xtol=1e-10, rtol=1e-10)


def _gdp_sigma_guess(target: float, delta: float, q: float, steps: int, prior: Key,
                     scale: float = 1.0) -> float | None:
    """sigma in [MIN_SIGMA, MAX_SIGMA] at which the GDP estimate of epsilon(prior + (sigma, q, steps))
    times ``scale`` is ``target`` (clipped to the range); None if the estimate cannot say."""
    from scipy.optimize import brentq

    prior_mu2 = sum(_gdp_mu(s, pq, n) ** 2 for s, pq, n in prior)

    def log_excess(log_sigma):
        eps = _gdp_epsilon(math.sqrt(prior_mu2 + _gdp_mu(math.exp(log_sigma), q, steps) ** 2), delta)
        return math.log(max(eps * scale, 1e-300)) - math.log(target)

    lo, hi = math.log(MIN_SIGMA), math.log(MAX_SIGMA)
    try:
        if log_excess(hi) >= 0:
            return MAX_SIGMA  # by this estimate, not even MAX_SIGMA reaches the target
        if log_excess(lo) <= 0:
            return MIN_SIGMA
        return math.exp(brentq(log_excess, lo, hi, xtol=1e-6))
    except (ArithmeticError, ValueError, RuntimeError):
        return None


class _Found(Exception):
    def __init__(self, sigma: float):
        self.sigma = sigma


def calibrate_noise_multiplier(target_epsilon: float, delta: float, sample_rate: float, steps: int,
                               accountant: str = "prv", prior: Sequence[Mechanism] = (),
                               epsilon_tolerance: float = 0.005) -> float:
    """Smallest sigma (to within ``epsilon_tolerance``) with
    ``compute_epsilon(prior + [Mechanism(sigma, sample_rate, steps)], delta) <= target_epsilon``.

    The returned sigma's epsilon lies in ``[target * (1 - epsilon_tolerance), target]`` (exceptions,
    both feasible: ``MIN_SIGMA`` when even that little noise meets the target, and, with an
    AccountingWarning, targets inside a jump of epsilon at the PRV -> RDP hand-over). Raises
    ValueError, saying what to change, if the target cannot be reached with sigma <= MAX_SIGMA.

    Typically 3-4 accountant evaluations: a secant search on log(eps) vs log(sigma) started from
    the Gaussian-DP (CLT) estimate, safeguarded by a bracket and bisection.
    """
    _check_target(target_epsilon)
    _check_delta(delta)
    _check_sample_rate(sample_rate)
    _check_accountant(accountant)
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 1:
        raise ValueError(f"steps={steps!r} must be an integer >= 1")
    if not 0 < epsilon_tolerance < 1:
        raise ValueError(f"epsilon_tolerance={epsilon_tolerance!r} must be in (0, 1)")
    target, delta, q, steps = float(target_epsilon), float(delta), float(sample_rate), int(steps)
    prior = tuple(prior)
    prior_key = _key(prior)
    setting = f"q={q:.4g}, {steps} steps, delta={delta:.3g}, accountant={accountant}"

    prior_eps = _epsilon(prior, delta, accountant)[0]
    if prior_eps >= target:
        raise ValueError(
            f"privacy.target_epsilon={target:g} is unreachable: the earlier phases already spent epsilon="
            f"{prior_eps:.4g} at delta={delta:.3g} on their own. Use a larger target_epsilon (or a larger delta), "
            "or make the earlier phases spend less (more noise, fewer steps, a lower sample rate)")

    lowest = target * (1 - epsilon_tolerance)
    aim = target * (1 - epsilon_tolerance / 2)
    evaluated: dict[float, float] = {}

    def eps_at(sigma: float) -> float:
        if sigma not in evaluated:
            evaluated[sigma] = _epsilon(prior + (Mechanism(sigma, q, steps),), delta, accountant)[0]
        eps = evaluated[sigma]
        if lowest <= eps <= target:
            raise _Found(sigma)
        return eps

    def gdp_guess(scale: float = 1.0) -> float | None:
        return _gdp_sigma_guess(aim, delta, q, steps, prior_key or (), scale)

    def unreachable(eps_max: float) -> ValueError:
        return ValueError(
            f"privacy.target_epsilon={target:g} is unreachable with {setting}: the smallest epsilon this data "
            f"size, batch and number of steps allow is about {eps_max:.4g} (at noise_multiplier={MAX_SIGMA:g})"
            + (f"; the earlier phases alone spend {prior_eps:.4g}" if prior else "")
            + ". Use fewer steps (epochs), a lower sample rate (smaller batch), a larger target_epsilon or a larger "
            "delta" + (" (PRV epsilons carry a 0.01 error margin)" if accountant == "prv" else ""))

    # Secant method on y(s) = log eps(e^s) - log aim (nearly linear), safeguarded by a bracket
    # lo < s* < hi (eps(e^lo) > target >= eps(e^hi)) and bisection. The first point comes from the
    # Gaussian-DP (CLT) estimate, the second from that estimate rescaled by its error at the first.
    log_min, log_max = math.log(MIN_SIGMA), math.log(MAX_SIGMA)
    points: list[tuple[float, float]] = []
    lo = hi = None
    widths: list[float] = []
    s = math.log(min(max(gdp_guess() or 1.0, MIN_SIGMA), MAX_SIGMA))
    try:
        for _ in range(100):
            eps = eps_at(math.exp(s))
            y = (math.log(eps) if 0 < eps < math.inf else (math.inf if eps > 0 else -math.inf)) - math.log(aim)
            points.append((s, y))
            if eps > target:
                lo = s if lo is None else max(lo, s)
            else:
                hi = s if hi is None else min(hi, s)
            if lo is not None and lo >= log_max:
                raise unreachable(eps)
            if hi is not None and hi <= log_min:
                return MIN_SIGMA  # degenerate: even this little noise meets the target
            if lo is not None and hi is not None and hi - lo < epsilon_tolerance / 50:
                break
            nxt = None
            if len(points) == 1 and math.isfinite(y):
                mechanisms = (prior_key or ()) + ((math.exp(s), q, steps),)
                gdp = _gdp_epsilon(math.sqrt(sum(_gdp_mu(*h) ** 2 for h in mechanisms)), delta)
                if 0 < gdp < math.inf:
                    guess = gdp_guess(scale=eps / gdp)
                    nxt = math.log(guess) if guess else None
            elif len(points) >= 2:
                (s0, y0), (s1, y1) = points[-2], points[-1]
                if math.isfinite(y0) and math.isfinite(y1) and y0 != y1:
                    nxt = s1 - y1 * (s1 - s0) / (y1 - y0)
            if lo is not None and hi is not None:
                widths.append(hi - lo)
                stalled = len(widths) >= 4 and widths[-1] > widths[-4] / 2
                if nxt is None or not lo < nxt < hi or stalled:
                    nxt = (lo + hi) / 2
            elif lo is not None:  # need more noise: move up, at most 4x
                nxt = min(max(nxt if nxt is not None else lo + math.log(2), lo + 1e-3), lo + math.log(4), log_max)
            else:  # less noise: move down, at most 4x
                nxt = max(min(nxt if nxt is not None else hi - math.log(2), hi - 1e-3), hi - math.log(4), log_min)
            s = nxt
    except _Found as found:
        return found.sigma
    # No sigma gives an epsilon in range: epsilon jumps there (at the PRV -> RDP switch of
    # PRV_EPSILON_CUTOFF, or where PRV fails and RDP stands in). Return the smallest feasible sigma.
    feasible = [(sg, e) for sg, e in evaluated.items() if e <= target]
    if not feasible:
        raise unreachable(evaluated.get(MAX_SIGMA, math.nan))
    sigma, eps = min(feasible)
    warnings.warn(f"calibration for target_epsilon={target:g} ({setting}) stopped at noise_multiplier={sigma:.6g}, "
                  f"epsilon={eps:.4g}: epsilon jumps across the target there (the PRV accountant hands over to "
                  "RDP); the result is feasible but below the requested tolerance", AccountingWarning, stacklevel=2)
    return sigma


def max_steps_within_budget(noise_multiplier: float, sample_rate: float, target_epsilon: float, delta: float,
                            accountant: str = "prv", prior: Sequence[Mechanism] = ()) -> int:
    """Largest number of steps of ``(noise_multiplier, sample_rate)`` after ``prior`` keeping
    epsilon <= target_epsilon (0 if not even one step fits; at most ``MAX_STEPS``)."""
    _check_target(target_epsilon)
    _check_delta(delta)
    _check_sample_rate(sample_rate)
    _check_accountant(accountant)
    Mechanism(noise_multiplier, sample_rate, 0)  # validates sigma
    prior = tuple(prior)

    def eps_fn(acc: str) -> Callable[[int], float]:
        return lambda n: _epsilon(prior + (Mechanism(noise_multiplier, sample_rate, n),), delta, acc)[0]

    target = float(target_epsilon)
    guess = 1
    if accountant == "prv":  # start from the (cheap, memoised) RDP answer
        guess = max(_largest_within(eps_fn("rdp"), target, 1), 1)
    return _largest_within(eps_fn(accountant), target, guess)


def _largest_within(eps: Callable[[int], float], target: float, guess: int) -> int:
    """Largest n in [0, MAX_STEPS] with eps(n) <= target, for eps non-decreasing in n: the secant
    method on (log n, log eps) from ``guess``, kept inside the bracket lo < n* < hi and falling back
    to bisection when the bracket stops shrinking. Ends by checking lo + 1."""
    values: dict[int, float] = {}

    def ok(n: int) -> bool:
        if n not in values:
            values[n] = eps(n)
        return values[n] <= target

    if not ok(1):
        return 0
    lo, hi = 1, None
    recent = [1]
    widths: list[int] = []
    n = min(max(int(guess), 1), MAX_STEPS)
    while True:
        if ok(n):
            lo = max(lo, n)
        else:
            hi = n if hi is None else min(hi, n)
        if n != recent[-1]:
            recent.append(n)
        if lo >= MAX_STEPS:
            return MAX_STEPS
        if hi is not None and hi - lo <= 1:
            return lo
        x = None
        if len(recent) >= 2:
            (n0, e0), (n1, e1) = [(k, values[k]) for k in recent[-2:]]
            if 0 < e0 < math.inf and 0 < e1 < math.inf and e0 != e1:
                log_x = math.log(n1) + (math.log(target) - math.log(e1)) * (math.log(n1) - math.log(n0)) / (
                    math.log(e1) - math.log(e0))
                x = math.exp(min(log_x, math.log(MAX_STEPS) + 1))
        if hi is None:  # expand upwards, at most 4x a step
            n = min(max(int(x) if x is not None else 2 * lo, lo + 1), 4 * lo, MAX_STEPS)
        else:
            widths.append(hi - lo)
            stalled = len(widths) >= 5 and widths[-1] > widths[-5] / 2
            n = (lo + hi) // 2 if x is None or stalled else min(max(int(x), lo + 1), hi - 1)


# -- live accountant -----------------------------------------------------------------------------------

class PrivacyAccountant:
    """Live accountant for one training phase: steps are recorded as they happen.

    ``prior`` are the mechanisms of earlier phases on the same data (composed with this phase's);
    ``history`` is this phase's own. ``delta`` should come from :func:`delta_default` or the config.
    """

    def __init__(self, accountant: str = "prv", delta: float = 1e-5, prior: Sequence[Mechanism] = (),
                 phase: str = ""):
        _check_accountant(accountant)
        _check_delta(delta)
        self.accountant, self.delta, self.phase = accountant, float(delta), str(phase)
        self.prior = tuple(prior)
        _key(self.prior)  # validates
        self._history: list[Mechanism] = []

    def step(self, noise_multiplier: float, sample_rate: float, num_steps: int = 1) -> None:
        new = Mechanism(noise_multiplier, sample_rate, num_steps, self.phase)  # validates
        if new.steps == 0:
            return
        last = self._history[-1] if self._history else None
        if last is not None and (last.noise_multiplier, last.sample_rate) == (new.noise_multiplier, new.sample_rate):
            self._history[-1] = Mechanism(last.noise_multiplier, last.sample_rate, last.steps + new.steps, self.phase)
        else:
            self._history.append(new)

    @property
    def history(self) -> list[Mechanism]:
        """This phase's mechanisms only (not the prior)."""
        return list(self._history)

    @property
    def steps(self) -> int:
        return sum(m.steps for m in self._history)

    def epsilon(self, delta: float | None = None, accountant: str | None = None) -> float:
        """Epsilon of prior + history; this accountant's method (PRV by default) unless
        ``accountant`` is given (e.g. ``"rdp"`` for the RDP bound beside it)."""
        return compute_epsilon(self.prior + tuple(self._history), self.delta if delta is None else delta,
                               accountant or self.accountant)

    def state_dict(self) -> dict:
        return {"accountant": self.accountant, "delta": self.delta, "phase": self.phase,
                "prior": [m.to_dict() for m in self.prior], "history": [m.to_dict() for m in self._history]}

    def load_state_dict(self, state: dict) -> None:
        _check_accountant(state["accountant"])
        _check_delta(state["delta"])
        prior = tuple(mechanism_from_dict(d) for d in state["prior"])  # may hold RDP curves (`dpc tune`)
        history = [Mechanism.from_dict(d) for d in state["history"]]
        self.accountant, self.delta, self.phase = state["accountant"], float(state["delta"]), str(state["phase"])
        self.prior, self._history = prior, history


# -- delta --------------------------------------------------------------------------------------------

def delta_default(dataset_size: int) -> float:
    """The default delta for N training examples: 1 / N^1.1.

    delta must be well below 1/N: releasing one uniformly chosen record verbatim is (0, 1/N)-DP,
    so delta >= 1/N permits leaking a whole record. 1/N^1.1 is strictly below 1/N for every N >= 2,
    and the margin grows with N (a factor N^0.1: 2.5x at N = 10^4, 3x at N = 67k, 4x at 10^6),
    i.e. delta = o(1/N); it sits near the common 1/(N ln N) choice for fine-tuning-sized data sets
    (within a factor ~4) while being a single closed form that is easy to state in a report.
    """
    n = _check_dataset_size(dataset_size)
    return 1.0 / n ** 1.1


def check_delta(delta: float, dataset_size: int) -> None:
    """Refuse delta outside (0, 1/N)."""
    n = _check_dataset_size(dataset_size)
    _check_delta(delta)
    if delta >= 1.0 / n:
        raise ValueError(
            f"privacy.delta={delta:.3g} must be < 1/N = {1 / n:.3g} for N={n} training examples (a delta of "
            f"1/N permits leaking a whole record); the usual choice is 1/(N ln N) = {1 / (n * math.log(n)):.3g}, "
            f"or leave it unset for the default 1/N^1.1 = {delta_default(n):.3g}")


def _check_dataset_size(dataset_size: int) -> int:
    if isinstance(dataset_size, bool) or not isinstance(dataset_size, numbers.Integral) or dataset_size < 2:
        raise ValueError(f"dataset_size={dataset_size!r} must be an integer >= 2")
    return int(dataset_size)
