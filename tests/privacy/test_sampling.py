"""Poisson sampling: inclusion frequency q, independence, rank agreement; shuffle: fixed batches."""

from __future__ import annotations

import numpy as np
import pytest

from dist_dpc.privacy.randomness import SecretKey
from dist_dpc.privacy.sampling import PoissonSampler, ShuffleSampler, make_sampler

N, B, MICRO = 2000, 50, 8


def samplers(kind, world, seed=11):
    cls = PoissonSampler if kind == "poisson" else ShuffleSampler
    return [cls(dataset_size=N, expected_batch_size=B, micro_batch_size=MICRO, rank=r, world_size=world,
                key=SecretKey.from_seed(seed))
            for r in range(world)]


def logical_batch(ranks, step):
    plans = [s.plan(step) for s in ranks]
    return plans, sorted(i for p in plans for mb in p.micro_batches for i in mb)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_ranks_agree_and_partition_the_logical_batch(world):
    ranks = samplers("poisson", world)
    for step in range(200):
        plans, batch = logical_batch(ranks, step)
        assert len({len(p.micro_batches) for p in plans}) == 1  # same number of micro-steps everywhere
        assert all(len(mb) <= MICRO for p in plans for mb in p.micro_batches)
        assert len(batch) == len(set(batch)) == plans[0].logical_batch_size
        assert {p.logical_batch_size for p in plans} == {len(batch)}


def test_inclusion_frequency_matches_q_and_draws_are_independent():
    (sampler,) = samplers("poisson", 1)
    steps = 3000
    q = B / N
    counts = np.zeros(N)
    sizes = []
    pair = 0  # examples 0 and 1 drawn together
    for step in range(steps):
        _, batch = logical_batch([sampler], step)
        counts[batch] += 1
        sizes.append(len(batch))
        pair += (0 in batch) and (1 in batch)
    # Each count ~ Binomial(steps, q): the mean over N examples within 4 standard errors.
    assert abs(counts.mean() / steps - q) < 4 * np.sqrt(q * (1 - q) / (steps * N))
    # Spread across examples as a binomial's (dispersion ratio ~ 1), not a fixed schedule's.
    dispersion = counts.var() / (steps * q * (1 - q))
    assert 0.85 < dispersion < 1.15, dispersion
    # Batch size ~ Binomial(N, q): variance N q (1 - q), unlike fixed-size batches.
    assert abs(np.var(sizes) / (N * q * (1 - q)) - 1) < 0.15
    assert abs(np.mean(sizes) - B) < 4 * np.sqrt(N * q * (1 - q) / steps)
    # Inclusions are independent: P(both) = q^2.
    assert abs(pair / steps - q * q) < 4 * np.sqrt(q * q / steps) + 1e-3


def test_plans_depend_only_on_key_and_step():
    a, b = samplers("poisson", 2, seed=5), samplers("poisson", 2, seed=5)
    assert [a[1].plan(s).micro_batches for s in (0, 7, 99)] == [b[1].plan(s).micro_batches for s in (99, 7, 0)][::-1]
    other = samplers("poisson", 2, seed=6)
    assert a[0].plan(3).micro_batches != other[0].plan(3).micro_batches


def test_empty_logical_batch_still_one_micro_step():
    s = PoissonSampler(dataset_size=10_000, expected_batch_size=1, micro_batch_size=4, rank=0, world_size=2,
                       key=SecretKey.from_seed(0))
    empties = [s.plan(step) for step in range(200) if s.plan(step).logical_batch_size == 0]
    assert empties, "expected some empty Poisson batches at q = 1e-4"
    assert all(len(p.micro_batches) == 1 and p.micro_batches[0] == [] for p in empties)


def test_shuffle_batches_are_fixed_and_cover_each_epoch_once():
    ranks = samplers("shuffle", 2)
    per_epoch = ranks[0].steps_per_epoch()
    seen = []
    for step in range(per_epoch):
        _, batch = logical_batch(ranks, step)
        assert len(batch) == B
        seen.extend(batch)
    assert len(seen) == len(set(seen)) == per_epoch * B


def test_bad_arguments():
    with pytest.raises(ValueError, match="train.batch_size"):
        PoissonSampler(dataset_size=10, expected_batch_size=20, micro_batch_size=4, rank=0, world_size=1,
                       key=SecretKey.from_seed(0))
    with pytest.raises(ValueError, match="privacy.sampling"):
        make_sampler("uniform", dataset_size=10, expected_batch_size=2, micro_batch_size=4, rank=0, world_size=1,
                     key=SecretKey.from_seed(0))
