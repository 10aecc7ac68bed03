"""Plain-text splits: what every loader returns before tokenisation."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TextSplit:
    """One split: texts (and second texts of pairs) with class labels (classification), or texts
    with optional control-code prefixes (causal LM: ``labels`` is None)."""
    name: str
    texts: list[str]
    text_pairs: list[str] | None
    labels: list[int] | None
    prefixes: list[str] | None = None  # causal LM: control codes that condition the text, no loss on them

    def __len__(self) -> int:
        return len(self.texts)

    def head(self, count: int) -> "TextSplit":
        return self.take(range(min(count, len(self))))

    def take(self, indices) -> "TextSplit":
        indices = list(indices)
        pick = lambda xs: [xs[i] for i in indices] if xs is not None else None  # noqa: E731
        return TextSplit(self.name, pick(self.texts), pick(self.text_pairs), pick(self.labels), pick(self.prefixes))


@dataclass
class TaskData:
    task: str
    train: TextSplit
    eval: dict[str, TextSplit]
    label_names: list[str] | None  # the public schema; None: integer labels, count from model.num_labels
    is_pair: bool
    source: str
    holdout: TextSplit | None = None  # private: held out of train (data.holdout_fraction), never reported
    dataset_size: int | None = None   # N of the private data set (train and holdout together)
    # With a holdout, the parts' sizes depend on the data: what is released (q, steps, scores) uses these.
    public_train_size: int | None = None
    public_holdout_size: int | None = None

    @property
    def num_labels(self) -> int | None:
        return len(self.label_names) if self.label_names is not None else None
