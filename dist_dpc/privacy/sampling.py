"""Logical batches: Poisson sampling (what the accountant assumes) or fixed-size shuffled batches.

Every rank draws the *whole* logical batch from the same keyed generator and keeps its share, so
all ranks know every rank's share size — and therefore the common number of micro-steps — without
any communication. The draw for step ``s`` depends only on (key, step): which examples are in a
batch is as secret as the noise (it is what Poisson subsampling amplification relies on), so the
generator is keyed by the phase's 128-bit-derived SecretKey, never by a small seed. A resumed run
samples exactly the batches an uninterrupted run would have if it has the same key
(privacy.randomness=insecure_reproducible); in secure mode a restarted phase holds a fresh key and
draws fresh batches for its remaining steps, which is fine for DP (each step is a fresh Poisson draw).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from dist_dpc.privacy.randomness import SecretKey


@dataclass(frozen=True)
class StepPlan:
    """This rank's micro-batches for one logical step (lists of dataset indices, some maybe empty)."""

    micro_batches: list[list[int]]
    logical_batch_size: int  # examples in the logical batch, all ranks together


class _Sampler:
    def __init__(self, dataset_size: int, expected_batch_size: int, micro_batch_size: int, rank: int, world_size: int,
                 key: SecretKey, sample_rate: float | None = None):
        if dataset_size < 1:
            raise ValueError("the training set is empty")
        if not 1 <= expected_batch_size <= dataset_size:
            raise ValueError(f"train.batch_size={expected_batch_size} must be in [1, N={dataset_size}] (the expected logical batch size)")
        if micro_batch_size < 1:
            raise ValueError(f"train.micro_batch_size={micro_batch_size} must be >= 1")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.dataset_size = dataset_size
        self.expected_batch_size = expected_batch_size
        self.micro_batch_size = micro_batch_size
        self.rank, self.world_size, self._key = rank, world_size, key
        # q, when it is not B / N: a training part whose size depends on the data (a content-hashed
        # holdout) samples at the rate of its public stand-in size.
        if sample_rate is not None and not 0 < sample_rate <= 1:
            raise ValueError(f"sample_rate={sample_rate!r} must be in (0, 1]")
        self._sample_rate = sample_rate

    @property
    def sample_rate(self) -> float:
        return self._sample_rate if self._sample_rate is not None else self.expected_batch_size / self.dataset_size

    def _rng(self, *labels: int) -> np.random.Generator:
        return self._key.generator("sampling", *labels)

    def _split(self, batch: np.ndarray) -> StepPlan:
        """Round-robin over ranks, then micro-batches; all ranks get the same micro-step count."""
        shares = [batch[r::self.world_size] for r in range(self.world_size)]
        num_micro = max(1, math.ceil(max(len(s) for s in shares) / self.micro_batch_size))
        mine = shares[self.rank].tolist()
        m = self.micro_batch_size
        micro = [mine[i * m:(i + 1) * m] for i in range(num_micro)]
        return StepPlan(micro_batches=micro, logical_batch_size=int(len(batch)))

    def state_dict(self) -> dict:
        """The sampler kind only: the key is never saved (see the module docstring)."""
        return {"kind": type(self).__name__}

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != type(self).__name__:
            raise ValueError(f"checkpoint was written with {state.get('kind')}, this run uses {type(self).__name__}")


class PoissonSampler(_Sampler):
    """Each example joins the logical batch independently with probability q = B / N.

    Drawn as K ~ Binomial(N, q) then a uniform K-subset, which is the same distribution and costs
    O(K) rather than O(N) per step.
    """

    poisson = True

    def plan(self, step: int) -> StepPlan:
        rng = self._rng(0, step)
        count = int(rng.binomial(self.dataset_size, self.sample_rate))
        batch = rng.choice(self.dataset_size, size=count, replace=False) if count else np.empty(0, dtype=np.int64)
        return self._split(np.sort(batch))

    def steps_per_epoch(self) -> int:
        return max(1, round(1 / self.sample_rate))


class ShuffleSampler(_Sampler):
    """Fixed-size batches from a per-epoch permutation (last incomplete batch dropped).

    The accountant's analysis assumes Poisson sampling; with this sampler the privacy report says so.
    """

    poisson = False

    def steps_per_epoch(self) -> int:
        return max(1, self.dataset_size // self.expected_batch_size)

    def plan(self, step: int) -> StepPlan:
        per_epoch = self.steps_per_epoch()
        epoch, index = divmod(step, per_epoch)
        perm = self._rng(1, epoch).permutation(self.dataset_size)
        b = self.expected_batch_size
        return self._split(perm[index * b:(index + 1) * b])


def make_sampler(kind: str, **kwargs) -> _Sampler:
    if kind == "poisson":
        return PoissonSampler(**kwargs)
    if kind == "shuffle":
        return ShuffleSampler(**kwargs)
    raise ValueError(f"privacy.sampling={kind!r} is invalid: allowed values are 'poisson', 'shuffle'")
