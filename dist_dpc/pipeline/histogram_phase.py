"""Phase histogram: a DP histogram of the control codes of the private training set, turned into the
prompt allocation `generate` samples by (Flemings & Annavaram 2024 count prompts per label without
privacy; here the counts are a Gaussian mechanism in the ledger).

    RUN/histogram/results.json   the noisy counts (clamped at 0), the allocation, sigma, epsilon
    RUN/histogram/allocation.jsonl   {"codes": [...], "count": n} per category: generate's prompts

The categories are the public schema (histogram.code_values), every one noised whether it occurs or
not; the exact counts are never written anywhere.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

from dist_dpc.data.labels import YELP_LABELS
from dist_dpc.data.lm import control_code_columns, control_prefix
from dist_dpc.pipeline.config import Config
from dist_dpc.pipeline.trainer import finish_phase, open_phase, open_tracker, reserve_budget
from dist_dpc.privacy.histogram import allocate, histogram_mechanism, noisy_histogram
from dist_dpc.tasks import make_task
from dist_dpc.utils.atomic import atomic_write
from dist_dpc.utils.logging import log

ALLOCATION = "allocation.jsonl"


def schema(cfg: Config) -> list[tuple[str, ...]]:
    """Every combination of the public control-code values, in a fixed order. Refuses (before any
    data is read) a task without control codes or without a public schema."""
    make_task(cfg.model, cfg.data).refuse_unsupported("histogram")
    columns = control_code_columns(cfg.data)
    if not columns:
        raise ValueError("histogram: the data has no control codes (data.control_code_columns is empty): a histogram "
                         "of control codes needs them; set data.control_code_columns to the label columns, or drop "
                         "histogram from pipeline.phases and give generate.prompts")
    values = cfg.histogram.code_values
    if values is None:
        if cfg.data.task == "yelp" and all(c in YELP_LABELS for c in columns):
            values = [YELP_LABELS[c] for c in columns]
        else:
            raise ValueError(f"histogram.code_values is required for data.task={cfg.data.task!r}: the public list of "
                             f"values of each control-code column {columns}, e.g. histogram.code_values="
                             "[[a, b], [x, y, z]]; it is never read from the private data")
    if len(values) != len(columns):
        raise ValueError(f"histogram.code_values has {len(values)} lists for {len(columns)} control-code columns "
                         f"{columns}: give one list of values per column, in that order")
    return [tuple(str(v).strip() for v in combo) for combo in itertools.product(*values)]


def check_histogram(cfg: Config, phases) -> None:
    """What the histogram phase would refuse, checked before a pipeline's first phase spends: the
    schema, a histogram that could not be calibrated, and prompts that would leave its allocation unused."""
    schema(cfg)
    if not cfg.privacy.enabled:
        raise ValueError("histogram with privacy.enabled=false would release the exact counts: it runs only in a "
                         "private run tree")
    if cfg.privacy.target_epsilon is None and cfg.histogram.noise_multiplier is None:
        raise ValueError("histogram: set privacy.target_epsilon (its sigma is then calibrated to the phase's share) or "
                         "histogram.noise_multiplier")
    if "generate" in phases and (cfg.generate.prompts or cfg.generate.prompts_file):
        raise ValueError("histogram is listed but generate.prompts / generate.prompts_file are set: generate would "
                         "ignore the DP allocation the histogram pays for. Drop the histogram phase, or the prompts")


def run_histogram(cfg: Config) -> dict:
    categories = schema(cfg)
    check_histogram(cfg, ())
    ctx = open_phase(cfg, "histogram", load_data=False)
    _refuse_out_of_order(cfg, ctx.ledger)
    n = ctx.ledger.dataset_size
    samples = cfg.histogram.samples or n
    budget = reserve_budget(ctx, sample_rate=1.0, steps=1, noise_multiplier=cfg.histogram.noise_multiplier)
    sigma = budget.noise_multiplier
    # The counts are computed only now, after the reservation (open_phase parsed the files for N and
    # the evaluation splits, and derived nothing from the training records).
    data = ctx.task.load_data()
    index = {control_prefix(codes): i for i, codes in enumerate(categories)}
    counts = [0] * len(categories)
    for prefix in data.train.prefixes or []:
        i = index.get(prefix)
        if i is not None:  # codes outside the public schema count nowhere (sensitivity stays 1)
            counts[i] += 1
    noisy = noisy_histogram(counts, sigma, ctx.key.derive("histogram"))
    del counts, data
    budget.release(histogram_mechanism(sigma, phase=budget.entry))  # before anything derived is written
    allocation = allocate(noisy, samples)
    clamped = [max(0.0, round(float(x), 3)) for x in noisy]
    tracker = open_tracker(ctx)
    results = {"phase": "histogram", "task": ctx.task.name, "metrics": {}, "steps": 1, "private": True,
               "noise_multiplier": sigma, "sample_rate": 1.0, "accountant": cfg.privacy.accountant,
               "sampling": "none (every record, q = 1)", "randomness": cfg.privacy.randomness, "dataset_size": n,
               "categories": [list(c) for c in categories], "noisy_counts": clamped, "allocation": allocation,
               "samples": samples, "allocation_file": str(ctx.directory / ALLOCATION)}
    if ctx.is_main:
        rows = "".join(json.dumps({"codes": list(c), "count": k}) + "\n" for c, k in zip(categories, allocation))
        atomic_write(ctx.directory / ALLOCATION, lambda tmp: tmp.write_text(rows))
    log(ctx.world, f"[histogram] {len(categories)} categories, sigma={sigma:.4g}: {samples} synthetic samples "
                   f"allocated ({sum(1 for k in allocation if k)} categories get prompts)")
    finish_phase(ctx, tracker, results, None)
    return results


def _refuse_out_of_order(cfg: Config, ledger) -> None:
    """Spending phases listed before the histogram must have spent first: its share is cumulative
    (pipeline.budget_split), so run ahead of them it would calibrate to their shares as well."""
    from dist_dpc.pipeline.config import SPENDING_PHASES

    listed = cfg.pipeline.phases
    if "histogram" not in listed:
        return
    earlier = [p for p in listed[:listed.index("histogram")] if p in SPENDING_PHASES]
    missing = [p for p in earlier if ledger.latest_attempt(p) is None]
    if missing:
        raise ValueError(f"histogram: pipeline.phases lists {missing} before it, and they have not run in this tree: "
                         "run them first (`dpc pipeline` runs the phases in order), or list histogram before them")


def allocation_prompts(root: Path) -> list[tuple[tuple[str, ...], int]] | None:
    """The prompts a completed histogram phase of the tree allocated (None: no such phase)."""
    path = root / "histogram" / ALLOCATION
    if not (root / "histogram" / "results.json").is_file() or not path.is_file():
        return None
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    return [(tuple(r["codes"]), int(r["count"])) for r in rows]

