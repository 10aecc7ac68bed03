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
                      guess_fractions=(0.02, 0.05, 0.1, 0.2, 0.5, 1.0)) -> dict:
    """The one-run bound with the number of guesses chosen without peeking at the scores.

    ``scores``: one array (one score per canary), or {name: array} for several statistics of the
    same run. Each (statistic, fraction f) pair, fixed before training, is one test: k = f m / 2
    guesses "in" on the highest scores and k "out" on the lowest. Fractions that could not reject
    even with every guess right are dropped first (usable_tests: public quantities only). Reporting
    the best test is a selection, so each runs at (1 - confidence) / (number of tests) (Bonferroni):
    whatever the scores, the chance that any of them rejects a true (epsilon, delta) is at most
    1 - confidence. Returns every test and ``epsilon_lb``, the largest of their bounds."""
    by_name = scores if isinstance(scores, dict) else {"score": scores}
    by_name = {name: np.asarray(v, dtype=np.float64) for name, v in by_name.items()}
    m = len(next(iter(by_name.values())))
    fractions = usable_tests(m, delta, confidence, guess_fractions, len(by_name))
    per_test = 1 - (1 - confidence) / max(1, len(fractions) * len(by_name))
    tests = []
    for name, values in by_name.items():
        for f in fractions:
            k = _guesses(f, m)
            r, v = one_run_guesses(values, included, k, k)
            tests.append({"score": name, "fraction": f, "guesses": r, "correct": v,
                          "epsilon_lb": epsilon_lower_bound(m, r, v, delta, per_test)})
    best = max(tests, key=lambda t: t["epsilon_lb"]) if tests else {"epsilon_lb": 0.0, "fraction": None, "score": None}
    return {"canaries": m, "included": int(np.asarray(included, dtype=bool).sum()), "delta": delta,
            "confidence": confidence, "per_test_confidence": per_test, "tests": tests,
            "epsilon_lb": best["epsilon_lb"], "best_fraction": best["fraction"], "best_score": best["score"],
            "ceiling": audit_ceiling(m, delta, confidence, guess_fractions, len(by_name)),
            "dropped_fractions": sorted(set(guess_fractions) - set(fractions))}
