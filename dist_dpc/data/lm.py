"""Causal-LM data: texts with optional control-code prefixes, tokenised so that only the text carries
loss, padded per micro-batch. One record is one example (no packing): the privacy unit is the record.

    tokens  = [BOS] + tokens(prefix) + tokens(text) + [EOS]        prefix = "code1\\tcode2\\n\\n"
    labels  = -100 on BOS, the prefix and padding; the token itself on the text and EOS
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from dist_dpc.data.config import DataConfig
from dist_dpc.data.files import yelp_files
from dist_dpc.data.glue import GLUE, load_glue_dir, load_glue_hub
from dist_dpc.data.overlap import refuse_overlap
from dist_dpc.data.splits import TaskData, TextSplit
from dist_dpc.data.synthetic import generate
from dist_dpc.data.tables import read_rows, require_file
from dist_dpc.data.tokenize import PAD_MULTIPLE, padded_ids
from dist_dpc.utils.atomic import PRIVATE_FILE, atomic_write, private_dir

IGNORE = -100  # label of a position that carries no loss (torch's cross_entropy ignore_index)
YELP_CONTROL_CODES = ["label1", "label2"]


def control_prefix(codes) -> str:
    """The prefix a text is conditioned on: the control codes, tab-separated, then a blank line."""
    return "\t".join(str(c).strip() for c in codes) + "\n\n"


# -- loading -----------------------------------------------------------------------------------------
def _file_split(path: Path, name: str, text_col: str, code_cols: list[str], field: str) -> TextSplit:
    if path.suffix.lower() == ".txt":
        if code_cols:
            raise ValueError(f"data.control_code_columns={code_cols}: {str(path)!r} is plain text and has no columns; "
                             "use a .csv/.tsv/.jsonl file with those columns, or set data.control_code_columns=[]")
        texts = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not texts:
            raise ValueError(f"{field}: {str(path)!r} holds no text")
        return TextSplit(name, texts, None, None)
    columns, rows = read_rows(path)
    if text_col not in columns:
        raise ValueError(f"data.text_column={text_col!r}: {str(path)!r} has no such column; its columns are "
                         f"{', '.join(columns)} (set data.text_column to the column holding the text)")
    missing = [c for c in code_cols if c not in columns]
    if missing:
        raise ValueError(f"data.control_code_columns={code_cols}: {str(path)!r} has no column "
                         f"{', '.join(repr(m) for m in missing)}; its columns are {', '.join(columns)} (set "
                         "data.control_code_columns to existing columns, or [] for no control codes)")
    if not rows:
        raise ValueError(f"{field}: {str(path)!r} is empty")
    texts = [str(r[text_col]) for r in rows]
    prefixes = [control_prefix(r[c] for c in code_cols) for r in rows] if code_cols else None
    return TextSplit(name, texts, None, None, prefixes)


def control_code_columns(cfg: DataConfig) -> list[str]:
    """The columns whose values prefix each text: data.control_code_columns, or (null) Yelp's two."""
    codes = cfg.control_code_columns
    if codes is None:
        codes = YELP_CONTROL_CODES if cfg.task == "yelp" else []
    return list(codes)


def read_lm_task(cfg: DataConfig) -> TaskData:
    """The splits of a causal-LM task: files (yelp, csv, text) or the texts of GLUE / the generated set."""
    if cfg.task in ("yelp", "csv", "text"):
        codes = control_code_columns(cfg)
        train_path, eval_path = _lm_files(cfg)
        train = _file_split(train_path, "train", cfg.text_column, codes, "data.train_file")
        evals = {}
        if eval_path is not None:
            evals["validation"] = _file_split(eval_path, "validation", cfg.text_column, codes, "data.eval_file")
            refuse_overlap(train, evals["validation"], train_path, eval_path)
        return TaskData(cfg.task, train, evals, None, False, str(train_path))
    if cfg.control_code_columns:
        raise ValueError(f"data.control_code_columns={cfg.control_code_columns} applies to files (data.task=yelp, csv); "
                         f"data.task={cfg.task!r} has none: remove it")
    if cfg.task == "synthetic_sentiment":
        data = generate(cfg.synthetic_size, cfg.seed)
    else:
        data = load_glue_dir(cfg.task, cfg.data_dir) if cfg.data_dir else load_glue_hub(cfg.task)
    strip = lambda s: TextSplit(s.name, s.texts, None, None)  # noqa: E731 (the texts only)
    return TaskData(cfg.task, strip(data.train), {k: strip(v) for k, v in data.eval.items()}, None, False, data.source)


def _lm_files(cfg: DataConfig) -> tuple[Path, Path | None]:
    if cfg.task == "yelp":
        return yelp_files(cfg)
    return (require_file(cfg.train_file, "data.train_file"),
            require_file(cfg.eval_file, "data.eval_file") if cfg.eval_file else None)


# -- tokenisation ------------------------------------------------------------------------------------
class LMDataset(torch.utils.data.Dataset):
    """Token ids per example and where its loss starts (after BOS and the control-code prefix)."""

    def __init__(self, input_ids: list[list[int]], loss_starts: list[int]):
        self.input_ids, self.loss_starts = input_ids, loss_starts

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.input_ids[i], "loss_start": self.loss_starts[i]}

    def state(self) -> dict:
        return {"input_ids": self.input_ids, "loss_starts": self.loss_starts}


def start_tokens(tokenizer) -> list[int]:
    """BOS where the model has its own (Llama-style); none where BOS is EOS (GPT-2)."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    return [bos] if bos is not None and bos != eos else []


def prompt_ids(tokenizer, prefix: str) -> list[int]:
    """What generation starts from: exactly the training examples' first tokens."""
    return start_tokens(tokenizer) + (tokenizer(prefix, add_special_tokens=False)["input_ids"] if prefix else [])


def tokenize_lm(split: TextSplit, tokenizer, max_length: int | None, cache_dir: str | Path | None = None) -> LMDataset:
    """``max_length`` truncates (training); None keeps whole texts (evaluation windows them)."""
    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no EOS token: causal_lm ends "
                         "every example with EOS; use model.tokenizer with one")
    cache_file = None
    if cache_dir is not None:
        h = hashlib.sha256(json.dumps(["lm", getattr(tokenizer, "name_or_path", ""), len(tokenizer), max_length,
                                       type(tokenizer).__name__]).encode())
        for text, prefix in zip(split.texts, split.prefixes or [""] * len(split)):
            h.update(prefix.encode("utf-8", "surrogatepass") + b"\1" + text.encode("utf-8", "surrogatepass") + b"\0")
        cache_file = private_dir(cache_dir) / f"lm-{split.name}-{h.hexdigest()[:24]}.pt"
        if cache_file.is_file():
            return LMDataset(**torch.load(cache_file, weights_only=False))
    start = start_tokens(tokenizer)
    texts = tokenizer(split.texts, add_special_tokens=False)["input_ids"]
    prefixes = (tokenizer(split.prefixes, add_special_tokens=False)["input_ids"] if split.prefixes is not None
                else [[] for _ in texts])
    ids, starts = [], []
    for prefix, text in zip(prefixes, texts):
        seq = start + list(prefix) + list(text) + [tokenizer.eos_token_id]
        ids.append(seq[:max_length] if max_length else seq)
        starts.append(len(start) + len(prefix))
    data = LMDataset(ids, starts)
    if cache_file is not None:
        atomic_write(cache_file, lambda tmp: torch.save(data.state(), tmp), mode=PRIVATE_FILE)
    return data


def collate_lm(examples: list[dict], pad_token_id: int, pad_to_multiple_of: int = PAD_MULTIPLE,
               num_rows: int | None = None, length: int | None = None) -> dict[str, torch.Tensor]:
    """Right-padded ids, attention mask, and labels (-100 where no loss: BOS, prefix, padding); with
    ``num_rows``, padding rows (sample_mask 0) fill the micro-batch."""
    input_ids, attention = padded_ids(examples, pad_token_id, pad_to_multiple_of, num_rows, length)
    labels = torch.full_like(input_ids, IGNORE)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        start = min(int(e["loss_start"]), n)
        labels[i, start:n] = input_ids[i, start:n]
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels,
            "sample_mask": torch.cat([torch.ones(len(examples)), torch.zeros(input_ids.shape[0] - len(examples))])}
