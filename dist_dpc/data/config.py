"""Which private data set to train on, and how to read it."""

from __future__ import annotations

from dataclasses import dataclass

TASKS = ("synthetic_sentiment", "sst2", "qnli", "mnli", "qqp", "yelp", "csv", "text")


@dataclass(kw_only=True)
class DataConfig:
    task: str = "synthetic_sentiment"
    """synthetic_sentiment (generated, no files), sst2, qnli, mnli, qqp (GLUE), yelp (control-code CSV),
    csv (.csv/.tsv/.jsonl by column), text (plain text, one example per non-empty line; causal_lm only)."""
    data_dir: str | None = None
    """GLUE: the directory holding SST-2/, QNLI/, MNLI/, QQP/ (or the task's own directory); yelp: the
    directory holding train.csv/dev.csv/test.csv. null for GLUE: the hub's glue configs (needs network)."""
    train_file: str | None = None
    """task=csv: training file (.csv, .tsv or .jsonl); yelp: overrides the training CSV."""
    eval_file: str | None = None
    """task=csv: evaluation file; yelp: overrides the evaluation CSV."""
    text_column: str = "text"
    """task=csv: column of the text."""
    text_pair_column: str | None = None
    """task=csv: column of the second text of a pair, if any."""
    label_column: str = "label"
    """task=csv: label column; yelp: label1 (business category) or label2 (stars)."""
    label_names: list[str] | None = None
    """task=csv/yelp: the class names in index order (the public label schema); a label in the files
    is one of these names or its index. They size the classifier and become config.json's id2label.
    null: yelp uses its published categories/stars, csv needs integer labels and model.num_labels.
    GLUE and the generated set always use their published labels. Never read from the private data."""
    control_code_columns: list[str] | None = None
    """model.task=causal_lm: columns whose values, tab-separated, are the control-code prefix of each
    example ("label1\tlabel2\n\n" + text + EOS); the prefix conditions the text and carries no loss.
    null: yelp uses [label1, label2], other sources have no prefix. [] : no prefix."""
    max_length: int = 128
    """Tokens per example after truncation (causal_lm: the training context; evaluation scores
    longer texts in windows of this many tokens). Batches are padded to their longest example
    rounded up to a multiple of 8, which must fit the model's positions (and a DPKD teacher's):
    refused before training otherwise, naming the largest value that fits."""
    eval_stride: int | None = None
    """model.task=causal_lm evaluation: a text longer than max_length is scored in windows of
    max_length tokens that advance by this many (each token scored once, with up to max_length -
    stride tokens of context carried over). null: max_length // 2."""
    max_train_samples: int | None = None
    """Use only this many training examples (a seeded subset; N for the accountant is this number)."""
    max_eval_samples: int | None = None
    """Evaluate on only this many examples per split (the first ones)."""
    synthetic_size: int = 2000
    """task=synthetic_sentiment: training examples generated (evaluation: a quarter as many)."""
    seed: int = 0
    """Seed of the subset, of the holdout and of the generated set."""
    holdout_fraction: float = 0.0
    """Hold this fraction of the training set out (seeded by data.seed) as a private validation split;
    the phases train on the rest. `dpc tune` sets it (tune.holdout_fraction) to score its trials."""

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"data.task={self.task!r} is invalid: allowed values are {', '.join(TASKS)}")
        if self.max_length < 8:
            raise ValueError(f"data.max_length={self.max_length!r} is invalid: must be >= 8")
        for key in ("max_train_samples", "max_eval_samples"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ValueError(f"data.{key}={value!r} is invalid: must be >= 1 or null")
        if not 0 <= self.holdout_fraction < 0.5:
            raise ValueError(f"data.holdout_fraction={self.holdout_fraction!r} is invalid: must be in [0, 0.5)")
        if self.synthetic_size < 8:
            raise ValueError(f"data.synthetic_size={self.synthetic_size!r} is invalid: must be >= 8")
        if self.task == "csv" and not self.train_file:
            raise ValueError("data.train_file=None is invalid for data.task='csv': give the path of a .csv, .tsv or .jsonl file")
        if self.task == "text" and not self.train_file:
            raise ValueError("data.train_file=None is invalid for data.task='text': give the path of a plain text file "
                             "(one example per non-empty line)")
        if self.eval_stride is not None and not 1 <= self.eval_stride < self.max_length:
            raise ValueError(f"data.eval_stride={self.eval_stride!r} is invalid: must be in [1, data.max_length - 1 = "
                             f"{self.max_length - 1}] or null (windows must overlap for every token to have context)")
        if self.label_names is not None:
            self._check_label_names()

    def _check_label_names(self) -> None:
        names = [str(n).strip() for n in self.label_names]
        if self.task not in ("csv", "yelp"):
            raise ValueError(f"data.label_names is set for data.task={self.task!r}, which has a published label "
                             "schema: remove data.label_names (it applies to task=csv and yelp)")
        if not names or "" in names or len(set(names)) != len(names):
            raise ValueError(f"data.label_names={self.label_names!r} is invalid: a non-empty list of distinct names")
        self.label_names = names
