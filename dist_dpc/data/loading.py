"""load_task: one entry for every supported data source."""

from __future__ import annotations

import random

from dist_dpc.data.config import DataConfig
from dist_dpc.data.files import load_csv_task, load_yelp
from dist_dpc.data.glue import GLUE, load_glue_dir, load_glue_hub
from dist_dpc.data.splits import TaskData
from dist_dpc.data.synthetic import generate


def load_task(cfg: DataConfig) -> TaskData:
    if cfg.task == "synthetic_sentiment":
        data = generate(cfg.synthetic_size, cfg.seed)
    elif cfg.task in GLUE:
        data = load_glue_dir(cfg.task, cfg.data_dir) if cfg.data_dir else load_glue_hub(cfg.task)
    elif cfg.task == "yelp":
        data = load_yelp(cfg)
    else:
        data = load_csv_task(cfg)
    if cfg.max_train_samples is not None and cfg.max_train_samples < len(data.train):
        # A seeded subset, in dataset order: the same N examples on every rank and every resume.
        keep = sorted(random.Random(cfg.seed).sample(range(len(data.train)), cfg.max_train_samples))
        data.train = data.train.take(keep)
    data.dataset_size = len(data.train)
    if cfg.holdout_fraction > 0:
        # A seeded split of the private set: the holdout is private data too (its uses are noised and
        # accounted by `dpc tune`); N for the accountant stays the whole set.
        n = len(data.train)
        held = set(random.Random(f"holdout:{cfg.seed}").sample(range(n), max(1, round(n * cfg.holdout_fraction))))
        data.holdout = data.train.take(sorted(held))
        data.holdout.name = "holdout"
        data.train = data.train.take([i for i in range(n) if i not in held])
    if cfg.max_eval_samples is not None:
        data.eval = {k: v.head(cfg.max_eval_samples) for k, v in data.eval.items()}
    if len(data.train) == 0:
        raise ValueError(f"data.task={cfg.task!r}: the training split is empty")
    return data
