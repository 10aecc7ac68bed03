"""With noise off, a sharded multi-rank DP step equals a single-process per-example reference.

For ZeRO 0/1/2/3 x world 1/2 x flat/per_layer x accumulation 1/2 x tiny BERT/GPT-2: the parameter
update of one DP-SGD step (SGD, lr 1000 so that the update, not float32 rounding of the
parameters, dominates final - initial) must equal -lr * sum_i clip(g_i) / B_expected from
explicit per-example gradients in float64, to 1e-5 relative error.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from dist_dpc.models import ModelConfig, load_sequence_classifier
from tests.engine.dp_worker import logical_batch
from tests.reference import classifier_loss, clipped_sum, per_example_grads

MICRO = 3
EXPECTED_BATCH = 7
SEED = 3
MAX_GRAD_NORM = 0.05  # small: most samples are clipped, so clipping errors show


def cases(world: int) -> list[dict]:
    out = []
    for model, stage, clipping, accumulation in itertools.product(
            ("tiny-bert", "tiny-gpt2"), (0, 1, 2, 3), ("flat", "per_layer"), (1, 2)):
        out.append({"model": model, "stage": stage, "clipping": clipping, "accumulation": accumulation,
                    "noise_multiplier": 0.0, "max_grad_norm": MAX_GRAD_NORM, "micro_batch_size": MICRO, "lr": 1000.0,
                    # one padding row in the last micro-batch of the last rank
                    "batch_size": world * accumulation * MICRO - 1})
    return out


def reference_update(case: dict) -> dict[str, torch.Tensor]:
    model = load_sequence_classifier(ModelConfig(name=case["model"], dropout=0.0), num_labels=2, seed=SEED).double()
    batch = logical_batch(model.config.vocab_size, case["batch_size"], 9, SEED)
    grads = per_example_grads(model, batch, classifier_loss)
    total = clipped_sum(model, grads, case["max_grad_norm"], case["clipping"])
    return {n: -case["lr"] * g / EXPECTED_BATCH for n, g in total.items()}


def update_error(result: dict, expected: dict[str, torch.Tensor]) -> float:
    """Relative error of a worker's update (final - initial) against the reference update.

    float32 ranks vs a float64 reference: the error is measured on the whole update vector
    (per-tensor errors of near-zero tensors such as a fresh LayerNorm's gradient are roundoff).
    """
    diff = torch.cat([(result["final"][n] - result["initial"][n] - d).flatten() for n, d in expected.items()])
    ref = torch.cat([d.flatten() for d in expected.values()])
    return float(diff.norm() / ref.norm())


@pytest.fixture(scope="module")
def references():
    cache = {}

    def get(case):
        key = (case["model"], case["clipping"], case["batch_size"])
        if key not in cache:
            cache[key] = reference_update(case)
        return cache[key]

    return get


@pytest.mark.timeout(900)
@pytest.mark.parametrize("world", [1, 2])
def test_dp_update_equals_per_example_reference(world, tmp_path, references):
    from tests.engine.launch import run_worker

    spec = {"cases": cases(world), "expected_batch_size": EXPECTED_BATCH, "seed": SEED}
    out = run_worker(spec, world, tmp_path, timeout=800)
    failures, worst = [], 0.0
    for case, result in zip(spec["cases"], out["results"]):
        err = update_error(result, references(case))
        worst = max(worst, err)
        if err > 1e-5:
            failures.append((case["model"], case["stage"], case["clipping"], case["accumulation"], err))
    print(f"world={world}: worst relative error {worst:.2e} over {len(spec['cases'])} cases")
    assert not failures, failures
