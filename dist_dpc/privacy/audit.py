"""The empirical lower bound on epsilon of a one-run audit (Steinke, Nasr & Jagielski, NeurIPS 2023).

m canaries are each included in the training set independently with probability 1/2. After
training, every canary gets a score (higher: more likely included). The auditor guesses "included"
for the k_plus highest scores and "excluded" for the k_minus lowest, abstaining on the rest: r =
k_plus + k_minus guesses, v of them correct. Under (epsilon, delta)-DP the number of correct guesses
is stochastically dominated, up to a delta term, by Binomial(r, e^eps / (1 + e^eps)) (their Theorem
5.2), so

    p(eps) = P[Binomial(r, q) >= v] + 2 m delta max_{1 <= i <= v} P[v - i <= Binomial(r, q) < v] / i,
    q = e^eps / (1 + e^eps),

is a p-value for "the training run was (eps, delta)-DP". The lower bound at confidence 1 - alpha
is the largest eps whose p-value stays below alpha: the run is shown not to be (eps, delta)-DP for
any smaller eps. k_plus and k_minus must be fixed before the scores are seen (no peeking), or the
confidence is not what it says.
"""

from __future__ import annotations

import math

import numpy as np


def audit_p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """The p-value above for v correct guesses out of r, with m canaries (min(., 1))."""
    from scipy.stats import binom

    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= v <= r <= m, got m={m}, r={r}, v={v}")
    if epsilon < 0 or not 0 <= delta <= 1:
        raise ValueError(f"epsilon={epsilon} must be >= 0 and delta={delta} in [0, 1]")
    q = 1.0 / (1.0 + math.exp(-epsilon))
    tail = float(binom.sf(v - 1, r, q))  # P[Binomial(r, q) >= v]
    if delta == 0 or v == 0:
        return min(tail, 1.0)
    # P[v - i <= B < v] for i = 1..v is a running sum of the pmf at v-1, v-2, ..., 0.
    below = np.cumsum(binom.pmf(np.arange(v - 1, -1, -1), r, q))
    worst = float(np.max(below / np.arange(1, v + 1)))
    return min(tail + 2 * m * delta * worst, 1.0)


def epsilon_lower_bound(m: int, r: int, v: int, delta: float, confidence: float = 0.95) -> float:
    """The largest epsilon the audit rejects at ``confidence`` (0 when it rejects none)."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence={confidence} must be in (0, 1)")
    alpha = 1 - confidence
    if audit_p_value(m, r, v, 0.0, delta) >= alpha:
        return 0.0
    low, high = 0.0, 1.0
    while audit_p_value(m, r, v, high, delta) < alpha:
        low, high = high, high * 2
        if high > 1e4:  # unreachable in practice (q rounds to 1 near 37): report what is proven
            return low
    for _ in range(60):
        mid = (low + high) / 2
        low, high = (mid, high) if audit_p_value(m, r, v, mid, delta) < alpha else (low, mid)
    return low


def one_run_guesses(scores, included, k_plus: int, k_minus: int) -> tuple[int, int]:
    """(r, v): guesses "in" for the k_plus highest scores and "out" for the k_minus lowest (ties
    broken by canary index, so the result does not depend on sort stability), and how many are right."""
    scores = np.asarray(scores, dtype=np.float64)
    included = np.asarray(included, dtype=bool)
    m = len(scores)
    if included.shape != scores.shape:
        raise ValueError("scores and included must have one entry per canary")
    if k_plus < 0 or k_minus < 0 or k_plus + k_minus > m:
        raise ValueError(f"k_plus={k_plus} and k_minus={k_minus} must be >= 0 with k_plus + k_minus <= m={m}")
    order = np.lexsort((np.arange(m), scores))  # ascending score, then index
    out_guesses, in_guesses = order[:k_minus], order[m - k_plus:] if k_plus else order[:0]
    correct = int(included[in_guesses].sum()) + int((~included[out_guesses]).sum())
    return k_plus + k_minus, correct


def usable_tests(m: int, delta: float, confidence: float, guess_fractions, num_scores: int = 1) -> list[float]:
    """The fractions worth testing, chosen from public quantities only (m, delta, confidence) before
    any score exists: a test that could not reject epsilon = 0 even with every guess right (the
    2 m delta term can swamp a small number of guesses) would only cost its share of the confidence."""
    fractions = sorted(set(guess_fractions))
    while fractions:
        per_test = 1 - (1 - confidence) / (len(fractions) * num_scores)
        keep = [f for f in fractions if epsilon_lower_bound(m, 2 * _guesses(f, m), 2 * _guesses(f, m), delta,
                                                            per_test) > 0]
        if keep == fractions:
            return fractions
        fractions = keep
    return []


def audit_ceiling(m: int, delta: float, confidence: float, guess_fractions, num_scores: int = 1) -> float:
    """The largest bound the audit can report (every guess right): a mechanism leakier than this
    cannot be told apart from one at this epsilon with these m, delta and confidence."""
    fractions = usable_tests(m, delta, confidence, guess_fractions, num_scores)
    if not fractions:
        return 0.0
    per_test = 1 - (1 - confidence) / (len(fractions) * num_scores)
    return max(epsilon_lower_bound(m, 2 * _guesses(f, m), 2 * _guesses(f, m), delta, per_test) for f in fractions)


def _guesses(fraction: float, m: int) -> int:
    return min(max(1, round(fraction * m / 2)), m // 2)


def audit_lower_bound(scores, included, delta: float, confidence: float = 0.95,
                      guess_fractions=(0.02, 0.05, 0.1, 0.2, 0.5, 1.0), test: str = "one_run",
                      mechanisms=None) -> dict:
    """The one-run bound with the number of guesses chosen without peeking at the scores.

    ``scores``: one array (one score per canary), or {name: array} for several statistics of the
    same run. Each (statistic, fraction f) pair, fixed before training, is one test. ``test``:
    "one_run" (Steinke et al.: k = f m / 2 guesses "in" on the highest scores and k "out" on the
    lowest, against one (epsilon, delta) pair) or "f_dp" (Mahloujifar et al.: f m guesses "in" on the
    highest scores, against the whole trade-off curve of ``mechanisms``, the audited run's
    (sigma, q, steps), with its noise scaled: see ScaledMechanisms). Fractions that could not reject
    even with every guess right are dropped first (public quantities only). Reporting the best test is
    a selection, so each runs at (1 - confidence) / (number of tests) (Bonferroni): whatever the
    scores, the chance that any of them rejects a true claim is at most 1 - confidence. Returns every
    test and ``epsilon_lb``, the largest of their bounds."""
    if test not in ("one_run", "f_dp"):
        raise ValueError(f"audit.test={test!r} is invalid: use one_run or f_dp")
    by_name = scores if isinstance(scores, dict) else {"score": scores}
    by_name = {name: np.asarray(v, dtype=np.float64) for name, v in by_name.items()}
    m = len(next(iter(by_name.values())))
    if test == "f_dp":
        if not mechanisms:
            raise ValueError("the f-DP test needs the audited run's mechanisms (sigma, q, steps)")
        family = ScaledMechanisms(mechanisms, delta)
        fractions = usable_fdp_tests(m, confidence, guess_fractions, len(by_name))
    else:
        fractions = usable_tests(m, delta, confidence, guess_fractions, len(by_name))
    per_test = 1 - (1 - confidence) / max(1, len(fractions) * len(by_name))
    tests = []
    for name, values in by_name.items():
        for f in fractions:
            if test == "f_dp":
                k = _fdp_guesses(f, m)
                r, v = one_run_guesses(values, included, k, 0)
                bound = fdp_epsilon_lower_bound(m, r, v, family, per_test)
            else:
                k = _guesses(f, m)
                r, v = one_run_guesses(values, included, k, k)
                bound = epsilon_lower_bound(m, r, v, delta, per_test)
            tests.append({"score": name, "fraction": f, "guesses": r, "correct": v, "epsilon_lb": bound})
    best = max(tests, key=lambda t: t["epsilon_lb"]) if tests else {"epsilon_lb": 0.0, "fraction": None, "score": None}
    if test == "f_dp":
        ceiling = max((fdp_epsilon_lower_bound(m, _fdp_guesses(f, m), _fdp_best(f, m), family, per_test)
                       for f in fractions), default=0.0)
        # Whether some test rejects the claimed curve itself (scale 1): the verdict, exact where the
        # bisection's epsilon_lb may land on the claimed epsilon.
        claim_rejected = any(fdp_rejects(m, t["guesses"], t["correct"], 1 - per_test, family.least_other(1.0))
                             for t in tests)
    else:
        ceiling = audit_ceiling(m, delta, confidence, guess_fractions, len(by_name))
        claim_rejected = None
    return {"test": test, "claim_rejected": claim_rejected, "canaries": m, "included": int(np.asarray(included, dtype=bool).sum()), "delta": delta,
            "confidence": confidence, "per_test_confidence": per_test, "tests": tests,
            "epsilon_lb": best["epsilon_lb"], "best_fraction": best["fraction"], "best_score": best["score"],
            "ceiling": ceiling, "dropped_fractions": sorted(set(guess_fractions) - set(fractions))}


# -- the f-DP one-run test (Mahloujifar, Melis & Chaudhuri, "Auditing f-Differential Privacy in One
# Run", ICML 2025) -------------------------------------------------------------------------------------
#
# The (epsilon, delta) test above asks whether the run is (eps, delta)-DP for one pair. A DP-SGD run
# claims much more: (eps', delta(eps'))-DP for every eps' at once, its whole privacy profile, which is
# its trade-off curve f. Testing the whole curve is tighter. The auditor guesses "included" for the k
# highest scores (one-sided) and c of the guesses are right. The paper bounds, for an f-DP mechanism,
# how the probability mass of "c or more right" must spread when one more guess is made wrong: with
# r the mass of the right guesses and h that of the wrong ones (both scaled by the test level tau),
# walking from c right guesses down to 0, each step forces h up to at least the least mass f allows a
# set of mass r under the neighbouring dataset, and pays for it in r. If the masses ever exceed what k
# guesses out of m can hold (r + h > k / m), "c right guesses with probability >= tau" is impossible
# under f: the claim is rejected at level tau.


def least_other_mass(epsilons, deltas):
    """h(x): the least probability, under one of two neighbouring datasets, of an event that has
    probability x under the other, for a mechanism that is (eps_j, delta_j)-DP for every j (both
    directions, as DP is). From P1(S) <= e^eps P0(S) + delta: P0(S) >= (x - delta) e^-eps, and from
    the complement: P0(S) >= 1 - delta - e^eps (1 - x). Vectorised over x."""
    epsilons = np.asarray(epsilons, dtype=np.float64)[:, None]
    deltas = np.asarray(deltas, dtype=np.float64)[:, None]

    def h(x):
        x = np.atleast_1d(np.asarray(x, dtype=np.float64))[None, :]
        low = np.maximum((x - deltas) * np.exp(-epsilons), 1 - deltas - np.exp(epsilons) * (1 - x))
        return np.maximum(low.max(axis=0), 0.0)
    return h


def fdp_rejects(m: int, k: int, c: int, alpha: float, least_other) -> bool:
    """Whether c right guesses out of k (one-sided, m canaries) reject, at level ``alpha``, the claim
    that the run is f-DP, f given by ``least_other`` (h above). The paper's recursion, capped at 1."""
    if not 0 <= c <= k <= m:
        raise ValueError(f"need 0 <= c <= k <= m, got m={m}, k={k}, c={c}")
    right, wrong = alpha * c / m, alpha * (k - c) / m
    for i in range(c - 1, -1, -1):
        forced = max(wrong, float(least_other(right)[0]))
        if forced == wrong:  # nothing moves any more: the masses are final
            break
        right = min(right + i / (k - i) * (forced - wrong), 1.0)
        wrong = forced
    return right + wrong > k / m


class ScaledMechanisms:
    """The family of runs that differ from the audited one only in noise: every mechanism's sigma
    times ``scale`` (a non-private run: DP-SGD at noise ``scale`` with its q and steps). The f-DP
    bound is the epsilon (at delta, the ledger's accountant) of the least noisy member whose curve
    the audit rejects: "the run leaked more than DP-SGD with the same q and steps at epsilon_lb".
    That is a lower bound on the run's own epsilon only if its trade-off curve has DP-SGD's shape (a
    mechanism of another shape, e.g. randomized response, can be rejected by a member of larger
    epsilon than its own); the verdict against the claimed curve (scale 1) holds for any mechanism."""

    EPSILON_GRID = np.concatenate([np.linspace(0, 4, 401), np.linspace(4.02, 40, 1800)])

    def __init__(self, mechanisms, delta: float):
        from dist_dpc.privacy.accounting import Mechanism

        self.delta = float(delta)
        self.base = [Mechanism(m.noise_multiplier or 1.0, m.sample_rate, m.steps) for m in mechanisms if m.steps]
        if not self.base:
            raise ValueError("the audited run has no DP-SGD step: nothing to audit")
        self._curves: dict[float, object] = {}

    def at(self, scale: float):
        from dist_dpc.privacy.accounting import Mechanism

        return [Mechanism(m.noise_multiplier * scale, m.sample_rate, m.steps) for m in self.base]

    def epsilon(self, scale: float) -> float:
        from dist_dpc.privacy.accounting import compute_epsilon

        return compute_epsilon(self.at(scale), self.delta)

    def least_other(self, scale: float):
        if scale not in self._curves:
            from dist_dpc.privacy.accounting import privacy_profile

            grid = self.EPSILON_GRID
            self._curves[scale] = least_other_mass(grid, privacy_profile(self.at(scale), grid))
        return self._curves[scale]


def _identity(x):
    return np.atleast_1d(np.asarray(x, dtype=np.float64))  # epsilon = 0: both datasets alike


def fdp_epsilon_lower_bound(m: int, k: int, c: int, family: ScaledMechanisms, confidence: float = 0.95) -> float:
    """The epsilon of the least noisy member of ``family`` that c right guesses of k reject at
    ``confidence`` (0 when even epsilon = 0 stands). The rejected members form an up-set in the noise
    (a more private claim forces more mass), so a bisection finds its edge, on the scales 2^(j/64)
    (1.1 % apart, shared by every test of an audit so their curves are computed once); the bound is
    the epsilon of the edge's rejected side, never overstated."""
    alpha = 1 - confidence
    if not fdp_rejects(m, k, c, alpha, _identity):
        return 0.0

    def rejected(j: int) -> bool:
        return fdp_rejects(m, k, c, alpha, family.least_other(2.0 ** (j / 64)))

    high = 0  # exponents: find a rejected one, then one that is not
    while not rejected(high):
        high += 128
        if high > 64 * 24:
            return 0.0  # only epsilon ~ 0 is rejected: below what the accountant resolves
    low = high - 128
    while rejected(low):
        high, low = low, low - 128
        if family.epsilon(2.0 ** (low / 64)) > ScaledMechanisms.EPSILON_GRID[-1]:
            return family.epsilon(2.0 ** (high / 64))  # beyond the curve's grid: report what is proven
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (low, mid) if rejected(mid) else (mid, high)
    return family.epsilon(2.0 ** (high / 64))


def _fdp_guesses(fraction: float, m: int) -> int:
    return min(max(1, round(fraction * m)), m)


def _fdp_best(fraction: float, m: int) -> int:
    """The most right guesses to plan for (public): every guess, but no more than the m / 2 canaries
    expected to be included (k = m guesses all right would need every canary included)."""
    return min(_fdp_guesses(fraction, m), m // 2)


def usable_fdp_tests(m: int, confidence: float, guess_fractions, num_scores: int = 1) -> list[float]:
    """As usable_tests, for the f-DP test: the fractions whose k guesses, all right, could reject
    epsilon = 0 at their share of the confidence (public quantities only)."""
    fractions = sorted(set(guess_fractions))
    while fractions:
        alpha = (1 - confidence) / (len(fractions) * num_scores)
        keep = [f for f in fractions if fdp_rejects(m, _fdp_guesses(f, m), _fdp_best(f, m), alpha, _identity)]
        if keep == fractions:
            return fractions
        fractions = keep
    return []
