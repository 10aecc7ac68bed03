"""Plain-text splits: what every loader returns before tokenisation."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TextSplit:
    name: str
    texts: list[str]
    text_pairs: list[str] | None
    labels: list[int]

    def __len__(self) -> int:
        return len(self.labels)

    def head(self, count: int) -> "TextSplit":
        pairs = self.text_pairs[:count] if self.text_pairs is not None else None
        return TextSplit(self.name, self.texts[:count], pairs, self.labels[:count])

    def take(self, indices) -> "TextSplit":
        pairs = [self.text_pairs[i] for i in indices] if self.text_pairs is not None else None
        return TextSplit(self.name, [self.texts[i] for i in indices], pairs, [self.labels[i] for i in indices])


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
