"""Property test: for random small models built from the supported layer types (tests/engine/
random_models.py: embeddings with and without padding_idx, broadcast position ids, Linear, GPT-2
Conv1D, LayerNorm, random depth, widths, sequence length and frozen parameters), one DP-SGD step
with noise off at ZeRO 0/1/2/3 on 2 real ranks, flat and per_layer, equals the float64 per-example
reference (tests/reference.py) to 1e-5 relative error. One torchrun launch runs every case.
"""

from __future__ import annotations

import itertools
import random

import pytest

from tests.engine.dp_worker import logical_batch
from tests.engine.random_models import RandomStack, random_model_loss, random_specs
from tests.engine.test_equivalence import update_error
from tests.reference import clipped_sum, per_example_grads

WORLD = 2
EXPECTED_BATCH = 5
SEED = 11
NUM_MODELS = 10


def cases() -> list[dict]:
    rng = random.Random(SEED)
    out = []
    for spec in random_specs(NUM_MODELS, SEED):
        micro, accumulation = rng.randint(1, 3), rng.randint(1, 2)
        # 1 .. all rows real: padding rows, and sometimes a rank with none of its own
        size = rng.randint(1, WORLD * accumulation * micro)
        for stage, clipping in itertools.product((0, 1, 2, 3), ("flat", "per_layer")):
            out.append({"random_model": spec, "stage": stage, "clipping": clipping, "accumulation": accumulation,
                        "micro_batch_size": micro, "batch_size": size, "noise_multiplier": 0.0,
                        "max_grad_norm": spec["max_grad_norm"], "lr": 1000.0})
    return out


def reference_update(case: dict) -> dict:
    spec = case["random_model"]
    model = RandomStack(spec).double()
    batch = logical_batch(spec["vocab"], case["batch_size"], spec["length"], SEED)
    grads = per_example_grads(model, batch, random_model_loss)
    total = clipped_sum(model, grads, case["max_grad_norm"], case["clipping"])
    return {n: -case["lr"] * g / EXPECTED_BATCH for n, g in total.items()}


@pytest.mark.timeout(400)
def test_random_models_match_per_example_reference(tmp_path):
    from tests.engine.launch import run_worker

    spec = {"cases": cases(), "expected_batch_size": EXPECTED_BATCH, "seed": SEED}
    out = run_worker(spec, WORLD, tmp_path, timeout=360)
    failures, worst = [], 0.0
    for case, result in zip(spec["cases"], out["results"]):
        err = update_error(result, reference_update(case))
        worst = max(worst, err)
        if not err <= 1e-5:
            failures.append((case["random_model"]["seed"], case["stage"], case["clipping"], err))
    print(f"worst relative error {worst:.2e} over {len(spec['cases'])} cases ({NUM_MODELS} models)")
    assert not failures, failures
