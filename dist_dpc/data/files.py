"""Yelp reviews with control codes (text,label1,label2) and generic CSV / TSV / JSON-lines tasks."""

from __future__ import annotations

from pathlib import Path

from dist_dpc.data.labels import YELP_LABELS, to_indices
from dist_dpc.data.overlap import refuse_overlap
from dist_dpc.data.splits import TaskData, TextSplit
from dist_dpc.data.tables import read_rows, require_columns, require_file


def _column_split(path: Path, name: str, text_col: str, pair_col: str | None, label_col: str):
    columns, rows = read_rows(path)
    require_columns(path, columns, [c for c in (text_col, pair_col, label_col) if c])
    if not rows:
        raise ValueError(f"{str(path)!r}: the {name} split is empty")
    texts = [str(r[text_col]) for r in rows]
    pairs = [str(r[pair_col]) for r in rows] if pair_col else None
    raw = [r[label_col] for r in rows]
    return texts, pairs, raw


def load_columns(task: str, train_path: Path, eval_path: Path | None, text_col: str, pair_col: str | None,
                 label_col: str, label_names: list[str] | None) -> TaskData:
    """Both splits, labels indexed by ``label_names`` (the public schema; None: integer labels)."""
    texts, pairs, raw = _column_split(train_path, "train", text_col, pair_col, label_col)
    train = TextSplit("train", texts, pairs, to_indices(raw, label_names, train_path, label_col, private=True))
    evals = {}
    if eval_path is not None:
        e_texts, e_pairs, e_raw = _column_split(eval_path, "validation", text_col, pair_col, label_col)
        evals["validation"] = TextSplit("validation", e_texts, e_pairs,
                                        to_indices(e_raw, label_names, eval_path, label_col, private=False))
        refuse_overlap(train, evals["validation"], train_path, eval_path)
    return TaskData(task, train, evals, label_names, pair_col is not None, str(train_path))


def load_csv_task(cfg) -> TaskData:
    train = require_file(cfg.train_file, "data.train_file")
    evals = require_file(cfg.eval_file, "data.eval_file") if cfg.eval_file else None
    return load_columns("csv", train, evals, cfg.text_column, cfg.text_pair_column, cfg.label_column, cfg.label_names)


def yelp_files(cfg) -> tuple[Path, Path | None]:
    """Yelp's (training, evaluation) files: train.csv if present, else dev.csv; test.csv (or the
    data.train_file / data.eval_file overrides)."""
    base = Path(cfg.data_dir) if cfg.data_dir else None
    if cfg.train_file:
        train = require_file(cfg.train_file, "data.train_file")
    elif base is None:
        raise FileNotFoundError("data.task='yelp' needs data.data_dir (the directory holding dev.csv/test.csv) "
                                "or data.train_file")
    else:
        train = next((base / n for n in ("train.csv", "dev.csv") if (base / n).is_file()), None)
        if train is None:
            raise FileNotFoundError(f"data.data_dir={cfg.data_dir!r}: neither train.csv nor dev.csv exists there")
    if cfg.eval_file:
        return train, require_file(cfg.eval_file, "data.eval_file")
    return train, base / "test.csv" if base is not None and (base / "test.csv").is_file() else None


def load_yelp(cfg) -> TaskData:
    """Yelp as a classification task: label1 (category) or label2 (stars)."""
    if cfg.label_column not in ("label1", "label2"):  # checked here: a causal LM reads no label column
        raise ValueError(f"data.label_column={cfg.label_column!r} is invalid for yelp: allowed values are 'label1' "
                         "(category), 'label2' (stars)")
    train, evals = yelp_files(cfg)
    names = cfg.label_names or YELP_LABELS[cfg.label_column]
    return load_columns("yelp", train, evals, "text", None, cfg.label_column, names)
