"""Tokenisation (cached per run) and fixed-row collation into micro-batches."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from dist_dpc.data.splits import TextSplit
from dist_dpc.utils.atomic import PRIVATE_FILE, atomic_write, private_dir


class TokenizedDataset(torch.utils.data.Dataset):
    """Unpadded token ids per example; padding happens per micro-batch in ``collate``."""

    def __init__(self, input_ids: list[list[int]], labels: list[int], token_type_ids: list[list[int]] | None = None):
        self.input_ids, self.labels, self.token_type_ids = input_ids, labels, token_type_ids

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        item = {"input_ids": self.input_ids[i], "labels": self.labels[i]}
        if self.token_type_ids is not None:
            item["token_type_ids"] = self.token_type_ids[i]
        return item

    def state(self) -> dict:
        return {"input_ids": self.input_ids, "labels": self.labels, "token_type_ids": self.token_type_ids}


def _cache_key(split: TextSplit, tokenizer, max_length: int) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([getattr(tokenizer, "name_or_path", ""), len(tokenizer), max_length, type(tokenizer).__name__]).encode())
    for text in split.texts:
        h.update(text.encode("utf-8", "surrogatepass") + b"\0")
    for text in split.text_pairs or []:
        h.update(text.encode("utf-8", "surrogatepass") + b"\1")
    h.update(json.dumps(split.labels).encode())
    return h.hexdigest()[:24]


def tokenize_split(split: TextSplit, tokenizer, max_length: int, cache_dir: str | Path | None = None) -> TokenizedDataset:
    cache_file = None
    if cache_dir is not None:
        # The cache is the private data itself: 0700 directory, 0600 files.
        cache_file = private_dir(cache_dir) / f"{split.name}-{_cache_key(split, tokenizer, max_length)}.pt"
        if cache_file.is_file():
            return TokenizedDataset(**torch.load(cache_file, weights_only=False))
    enc = tokenizer(split.texts, split.text_pairs, truncation=True, max_length=max_length)
    data = TokenizedDataset(list(enc["input_ids"]), list(split.labels), list(enc["token_type_ids"]) if "token_type_ids" in enc else None)
    if cache_file is not None:
        atomic_write(cache_file, lambda tmp: torch.save(data.state(), tmp), mode=PRIVATE_FILE)  # ranks may race on it
    return data


PAD_MULTIPLE = 8  # batches are padded to their longest example rounded up to this (tensor-core friendly shapes)


def padded_ids(examples: list[dict], pad_token_id: int, pad_to_multiple_of: int = PAD_MULTIPLE,
               num_rows: int | None = None, length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) right-padded to the longest example rounded up, or to exactly
    ``length`` (a shape that depends on no example's length); with ``num_rows``, padding rows fill
    the micro-batch (attending to one position, so softmax stays finite)."""
    rows = num_rows if num_rows is not None else len(examples)
    if rows < len(examples):
        raise ValueError(f"{len(examples)} examples do not fit in {rows} rows")
    longest = max([len(e["input_ids"]) for e in examples] + [1])
    if length is None:
        length = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
    elif longest > length:
        raise ValueError(f"an example of {longest} tokens does not fit in a batch padded to {length} (data.max_length)")
    input_ids = torch.full((rows, length), pad_token_id, dtype=torch.long)
    attention = torch.zeros(rows, length, dtype=torch.long)
    attention[len(examples):, 0] = 1
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        input_ids[i, :n] = torch.as_tensor(e["input_ids"], dtype=torch.long)
        attention[i, :n] = 1
    return input_ids, attention


def collate(examples: list[dict], pad_token_id: int, pad_to_multiple_of: int = PAD_MULTIPLE, num_rows: int | None = None,
            length: int | None = None) -> dict[str, torch.Tensor]:
    """Pad to the longest example (rounded up), or to exactly ``length``; with ``num_rows``, append
    padding rows (sample_mask 0) so that every micro-batch has the same number of rows on every rank."""
    input_ids, attention = padded_ids(examples, pad_token_id, pad_to_multiple_of, num_rows, length)
    rows, length = input_ids.shape
    has_types = bool(examples) and "token_type_ids" in examples[0]
    types = torch.zeros(rows, length, dtype=torch.long) if has_types else None
    labels = torch.zeros(rows, dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        labels[i] = int(e["labels"])
        if has_types:
            types[i, :n] = torch.tensor(e["token_type_ids"])
    out = {"input_ids": input_ids, "attention_mask": attention, "labels": labels,
           "sample_mask": torch.cat([torch.ones(len(examples)), torch.zeros(rows - len(examples))])}
    if has_types:
        out["token_type_ids"] = types
    return out


def check_labels(split: TextSplit, num_labels: int) -> None:
    """Refuse a label outside the head's range. The training split's offending values are not
    shown: the message is printed and logged, and they are private; the refusal itself says only
    that the data is malformed."""
    bad = sorted({y for y in split.labels if not 0 <= y < num_labels})
    if bad:
        shown = "" if split.name == "train" else f" {bad[:5]}"
        raise ValueError(f"the {split.name} split has labels{shown} outside [0, {num_labels}) (the classifier's "
                         f"{num_labels} classes): set data.label_names / model.num_labels to the task's full label "
                         "schema, or fix the label column")
