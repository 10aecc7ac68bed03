"""load_task: one entry for every supported data source."""

from __future__ import annotations

import random

from dist_dpc.data.config import DataConfig
from dist_dpc.data.files import load_csv_task, load_yelp
from dist_dpc.data.glue import GLUE, load_glue_dir, load_glue_hub
from dist_dpc.data.splits import TaskData
from dist_dpc.data.synthetic import generate


def split_holdout(data: TaskData, fraction: float, seed: int) -> None:
    """Hold out each example independently of all others: by a keyed hash of its own content
    (text, pair, label) and data.seed, below ``fraction``. Adding or removing one example changes
    only where that example goes (a split by position would move others too, which add/remove DP
    does not cover). The parts' sizes then depend on the data, so everything released uses the
    public stand-ins ``public_train_size`` / ``public_holdout_size`` (from N and the fraction)."""
    import hashlib

    train, n = data.train, len(data.train)
    pairs = train.text_pairs or [None] * n
    labels = train.labels if train.labels is not None else train.prefixes or [None] * n
    held = []
    for i, (text, pair, label) in enumerate(zip(train.texts, pairs, labels)):
        digest = hashlib.blake2b(f"{text}\x1f{pair}\x1f{label}".encode(), key=f"holdout:{seed}".encode()[:64],
                                 digest_size=8).digest()
        held.append(int.from_bytes(digest, "little") < fraction * 2**64)
    data.holdout = train.take([i for i in range(n) if held[i]])
    data.holdout.name = "holdout"
    data.train = train.take([i for i in range(n) if not held[i]])
    data.public_holdout_size = max(1, round(n * fraction))
    data.public_train_size = n - data.public_holdout_size


def load_task(cfg: DataConfig) -> TaskData:
    """The labelled splits of a classification task."""
    if cfg.task == "text":
        raise ValueError("data.task='text' (plain text, no labels) is for model.task=causal_lm; a classifier needs "
                         "labels: use data.task=csv with data.label_column")
    if cfg.task == "synthetic_sentiment":
        data = generate(cfg.synthetic_size, cfg.seed)
    elif cfg.task in GLUE:
        data = load_glue_dir(cfg.task, cfg.data_dir) if cfg.data_dir else load_glue_hub(cfg.task)
    elif cfg.task == "yelp":
        data = load_yelp(cfg)
    else:
        data = load_csv_task(cfg)
    return subset(data, cfg)


def load_lm_task(cfg: DataConfig) -> TaskData:
    """The texts (and control-code prefixes) of a causal-LM task."""
    from dist_dpc.data.lm import read_lm_task

    return subset(read_lm_task(cfg), cfg)


def subset(data: TaskData, cfg: DataConfig) -> TaskData:
    """data.max_train_samples, the holdout and data.max_eval_samples, the same for every task."""
    if cfg.max_train_samples is not None and cfg.max_train_samples < len(data.train):
        # A seeded subset, in dataset order: the same N examples on every rank and every resume.
        keep = sorted(random.Random(cfg.seed).sample(range(len(data.train)), cfg.max_train_samples))
        data.train = data.train.take(keep)
    data.dataset_size = len(data.train)
    if cfg.holdout_fraction > 0:
        split_holdout(data, cfg.holdout_fraction, cfg.seed)
    if cfg.max_eval_samples is not None:
        data.eval = {k: v.head(cfg.max_eval_samples) for k, v in data.eval.items()}
    if len(data.train) == 0:
        raise ValueError(f"data.task={cfg.task!r}: the training split is empty")
    return data
