"""Refuse an evaluation file that shares rows with the training file.

Metrics on the evaluation split are released without noise (they are not computed from the
protected set). A training row that is also an evaluation row breaks that: its loss and accuracy
would be released exactly. The refusal says only that the files overlap -- not how many rows or
which ones, since both are facts about the private training file.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from dist_dpc.data.splits import TextSplit


def _row_key(text: str, pair: str | None) -> bytes:
    # A digest per row keeps the set small for large files; the text fields are compared exactly
    # (up to surrounding whitespace), labels are not part of the key.
    joined = text.strip() + "\0" + ("" if pair is None else pair.strip())
    return hashlib.blake2b(joined.encode("utf-8", "surrogatepass"), digest_size=16).digest()


def _keys(split: TextSplit):
    pairs = split.text_pairs if split.text_pairs is not None else [None] * len(split.texts)
    return (_row_key(t, p) for t, p in zip(split.texts, pairs))


def refuse_overlap(train: TextSplit, evaluation: TextSplit, train_path: Path, eval_path: Path,
                   field: str = "data.eval_file") -> None:
    """Before training: the same file for both splits, or any shared (text, text pair), is refused."""
    if Path(train_path).resolve() == Path(eval_path).resolve() or _same_file(train_path, eval_path):
        raise ValueError(f"{field}: the evaluation file {str(eval_path)!r} is the training file: metrics on it would "
                         "release the private training data without noise. Give an evaluation file disjoint from "
                         "the training data")
    seen = set(_keys(train))
    if any(key in seen for key in _keys(evaluation)):
        raise ValueError(f"{field}: the evaluation file {str(eval_path)!r} shares rows (same text fields) with the "
                         f"training file {str(train_path)!r}: metrics on it would release those training examples "
                         "without noise. Remove the shared rows from the evaluation file")


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False
