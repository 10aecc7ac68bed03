"""GLUE tasks of the paper (SST-2, QNLI, MNLI, QQP): the original TSV files, or the hub's glue configs."""

from __future__ import annotations

import warnings
from pathlib import Path

from dist_dpc.data.overlap import refuse_overlap
from dist_dpc.data.splits import TaskData, TextSplit
from dist_dpc.data.tables import read_rows, require_columns

# task -> (directory, text columns, label column, label names in GLUE order, dev files by split name)
GLUE = {
    "sst2": ("SST-2", ("sentence", None), "label", ["negative", "positive"], {"validation": "dev.tsv"}),
    "qnli": ("QNLI", ("question", "sentence"), "label", ["entailment", "not_entailment"], {"validation": "dev.tsv"}),
    "mnli": ("MNLI", ("sentence1", "sentence2"), "gold_label", ["entailment", "neutral", "contradiction"],
             {"validation_matched": "dev_matched.tsv", "validation_mismatched": "dev_mismatched.tsv"}),
    "qqp": ("QQP", ("question1", "question2"), "is_duplicate", ["not_duplicate", "duplicate"], {"validation": "dev.tsv"}),
}


def task_dir(task: str, data_dir: str) -> Path:
    base = Path(data_dir)
    name = GLUE[task][0]
    for candidate in (base / name, base):
        if (candidate / "train.tsv").is_file():
            return candidate
    raise FileNotFoundError(f"data.data_dir={data_dir!r}: no {name}/train.tsv under it (nor train.tsv in it); "
                            f"point data.data_dir at the GLUE directory holding {name}/")


def _split(task: str, path: Path, name: str) -> TextSplit:
    _, (text_col, pair_col), label_col, names, _ = GLUE[task]
    if not path.is_file():
        raise FileNotFoundError(f"data.data_dir: GLUE file {str(path)!r} does not exist")
    columns, rows = read_rows(path, quoting_none=True)
    if task == "mnli" and label_col not in columns and "label" in columns:
        label_col = "label"
    require_columns(path, columns, [c for c in (text_col, pair_col, label_col) if c])
    texts, pairs, labels, skipped = [], [], [], 0
    for row in rows:
        text, pair, label = row.get(text_col), row.get(pair_col) if pair_col else "", row.get(label_col)
        if text is None or pair is None or label is None or label == "":
            skipped += 1  # QQP's original TSV has a few malformed rows
            continue
        label = label.strip()
        if label.isdigit():
            index = int(label)
        elif label in names:
            index = names.index(label)
        else:
            skipped += 1
            continue
        texts.append(text)
        pairs.append(pair)
        labels.append(index)
    if skipped:
        warnings.warn(f"{path}: skipped {skipped} malformed rows")
    if not labels:
        raise ValueError(f"{str(path)!r}: the {name} split is empty")
    return TextSplit(name, texts, pairs if pair_col else None, labels)


def load_glue_dir(task: str, data_dir: str) -> TaskData:
    directory = task_dir(task, data_dir)
    _, (_, pair_col), _, names, dev = GLUE[task]
    train = _split(task, directory / "train.tsv", "train")
    evals = {split: _split(task, directory / fname, split) for split, fname in dev.items()}
    for split, fname in dev.items():
        refuse_overlap(train, evals[split], directory / "train.tsv", directory / fname, field="data.data_dir")
    return TaskData(task, train, evals, names, pair_col is not None, str(directory))


def load_glue_hub(task: str) -> TaskData:
    """The hub's ``glue`` configs through ``datasets`` (needs network or a populated HF cache)."""
    try:
        import datasets

        ds = datasets.load_dataset("nyu-mll/glue", task)
    except Exception as exc:  # offline, hub unreachable, ...
        raise FileNotFoundError(
            f"data.task={task!r} with no data.data_dir: loading GLUE from the Hugging Face hub failed ({exc}). "
            f"Pass data.data_dir=/path/to/glue (the directory holding {GLUE[task][0]}/ with the original TSV files)") from exc
    _, _, _, names, dev = GLUE[task]
    text_col, pair_col = {"sst2": ("sentence", None), "qnli": ("question", "sentence"),
                          "mnli": ("premise", "hypothesis"), "qqp": ("question1", "question2")}[task]

    def split(name: str, part) -> TextSplit:
        keep = [i for i, label in enumerate(part["label"]) if label >= 0]
        texts = [part[text_col][i] for i in keep]
        pairs = [part[pair_col][i] for i in keep] if pair_col else None
        return TextSplit(name, texts, pairs, [int(part["label"][i]) for i in keep])

    evals = {s: split(s, ds[s]) for s in dev}
    return TaskData(task, split("train", ds["train"]), evals, names, pair_col is not None, f"hub:nyu-mll/glue/{task}")
