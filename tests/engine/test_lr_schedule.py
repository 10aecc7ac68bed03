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
