"""Learning-rate schedules: hand-computed factors; no step at lr 0; bad values refused."""

from __future__ import annotations

import pytest

from dist_dpc.engine.lr_schedule import lr_factor, make_lr_schedule
from dist_dpc.pipeline.config import TrainConfig


def test_linear_with_warmup_matches_hand_values():
    schedule = make_lr_schedule("linear", total_steps=10, warmup_steps=2)
    factors = [schedule(s) for s in range(10)]
    # warm-up 1/3, 2/3; then (10 - s) / 8 from s = 2 down to 1/8 at the last step
    expected = [1 / 3, 2 / 3, 1.0, 7 / 8, 6 / 8, 5 / 8, 4 / 8, 3 / 8, 2 / 8, 1 / 8]
    assert factors == pytest.approx(expected, abs=1e-12)


def test_constant_schedules():
    assert make_lr_schedule("constant", total_steps=5) is None  # the optimizer's lr is left alone
    warm = make_lr_schedule("constant", total_steps=6, warmup_steps=3)
    assert [warm(s) for s in range(6)] == pytest.approx([0.25, 0.5, 0.75, 1, 1, 1])


@pytest.mark.parametrize("total,warmup", [(1, 0), (1, 5), (7, 0), (7, 6), (300, 30)])
def test_no_step_has_zero_lr(total, warmup):
    # Every DP step spends privacy: none may be wasted at lr 0.
    factors = [lr_factor(s, schedule="linear", total_steps=total, warmup_steps=warmup) for s in range(total)]
    assert all(0 < f <= 1 for f in factors)


def test_bad_values_are_refused_with_the_field_name():
    with pytest.raises(ValueError, match="train.warmup_steps"):
        TrainConfig(warmup_steps=-1)
    with pytest.raises(ValueError, match="train.lr_schedule"):
        make_lr_schedule("cosine", total_steps=10)


@pytest.mark.timeout(600)
def test_schedule_reaches_every_zero_stage(tmp_path):
    """Two ranks, ZeRO 0-3: a warmed-up first step (factor 1/2) moves the parameters by exactly half the
    per-example reference update, so the lr set by the engine is the one DeepSpeed's partitions step with."""
    from tests.engine.launch import run_worker
    from tests.engine.test_equivalence import (EXPECTED_BATCH, MAX_GRAD_NORM, MICRO, SEED, reference_update,
                                               update_error)

    cases = [{"model": "tiny-bert", "stage": stage, "clipping": "per_layer", "accumulation": 1, "noise_multiplier": 0.0,
              "max_grad_norm": MAX_GRAD_NORM, "micro_batch_size": MICRO, "lr": 1000.0, "batch_size": 2 * MICRO - 1,
              "lr_schedule": "linear", "warmup_steps": 1, "steps": 1} for stage in (0, 1, 2, 3)]
    out = run_worker({"cases": cases, "expected_batch_size": EXPECTED_BATCH, "seed": SEED}, 2, tmp_path, timeout=500)
    expected = {n: 0.5 * d for n, d in reference_update(cases[0]).items()}
    for case, result in zip(cases, out["results"]):
        assert update_error(result, expected) < 1e-5, case["stage"]
