"""The private holdout of `dpc tune`: each example's side is decided by its own content, so adding or
removing one example moves no other example (what add/remove DP needs); released sizes are public."""

from __future__ import annotations

import random

from dist_dpc.data.loading import split_holdout
from dist_dpc.data.splits import TaskData, TextSplit


def task(texts: list[str]) -> TaskData:
    labels = [len(t) % 2 for t in texts]
    return TaskData("csv", TextSplit("train", list(texts), None, labels), {}, ["a", "b"], False, "test")


def sides(texts: list[str], fraction=0.2, seed=0) -> tuple[set, set, TaskData]:
    data = task(texts)
    data.dataset_size = len(texts)
    split_holdout(data, fraction, seed)
    return set(data.train.texts), set(data.holdout.texts), data


def test_neighbours_differ_only_in_the_added_example():
    rng = random.Random(0)
    texts = [f"review {i} {rng.random()}" for i in range(1000)]
    train, held, data = sides(texts)
    assert 140 < len(held) < 260 and train | held == set(texts) and not train & held
    assert data.public_holdout_size == 200 and data.public_train_size == 800  # from N and the fraction only
    extra = "a new review"
    for where in (0, 500, len(texts)):  # inserted anywhere: nobody else moves
        train2, held2, _ = sides(texts[:where] + [extra] + texts[where:])
        assert (train2 - {extra}, held2 - {extra}) == (train, held)
    # Another seed: another split.
    assert sides(texts, seed=1)[1] != held
