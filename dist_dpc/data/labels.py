"""The label schema of a task: class names and count come from the config or the task's published
schema, never from the private labels' values.

Which labels occur in the training file, and how many, are facts about the private data: a class
seen in one training row only would reveal that row if the head's size or the exported
config.json's id2label followed the data. A label outside the schema is refused; the refusal says
only that the training file is malformed, never which value it holds.
"""

from __future__ import annotations

from pathlib import Path

# The Yelp control-code set (Yue et al., ACL 2023): its published categories and star ratings, in
# the (sorted) index order earlier versions of dist-dpc used.
YELP_LABELS = {
    "label1": [f"Business Category: {c}" for c in (
        "Arts & Entertainment", "Bars", "Beauty & Spas", "Event Planning & Services", "Grocery",
        "Health & Medical", "Home & Garden", "Hotels & Travel", "Restaurants", "Shopping")],
    "label2": [f"Review Stars: {s}.0" for s in range(1, 6)],
}


def to_indices(raw: list, names: list[str] | None, path: Path, column: str, private: bool) -> list[int]:
    """Label values -> class indices: a name of ``names``, or an integer index. With ``names`` None
    (task=csv without data.label_names) only integer labels are accepted; their range is checked
    against the head's size later (check_labels). ``private``: the split is training data, whose
    offending values must not appear in the message (it is printed and logged)."""
    index = {name: i for i, name in enumerate(names or [])}
    out, bad = [], []
    for value in raw:
        text = str(value).strip()
        if text in index:
            out.append(index[text])
        elif text.lstrip("-").isdigit():
            out.append(int(text))
        else:
            bad.append(text)
    if bad:
        shown = "" if private else f" ({sorted(set(bad))[:5]})"
        fix = ("add the class to data.label_names or fix the file" if names is not None else
               "set data.label_names to the class names in index order (the task's public label schema)")
        raise ValueError(f"{str(path)!r}: column {column!r} holds labels that are neither one of data.label_names "
                         f"nor an integer index{shown}: {fix}")
    return out


def resolve_num_labels(task, configured: int | None) -> int:
    """The classifier's size: model.num_labels, else the length of the task's label schema."""
    if configured:
        if task.label_names is not None and configured < len(task.label_names):
            raise ValueError(f"model.num_labels={configured} is smaller than the task's {len(task.label_names)} classes "
                             f"({task.label_names[:3]}{'...' if len(task.label_names) > 3 else ''}): the label column "
                             f"would hold classes the head cannot predict. Set model.num_labels={len(task.label_names)} "
                             "or leave it null (the task's label schema sizes the head)")
        return configured
    if task.label_names is None:
        raise ValueError(f"data.task={task.task!r} without data.label_names: the number of classes is part of the "
                         "public label schema and is not read from the private labels. Set data.label_names (the "
                         "class names in index order) or model.num_labels (integer labels 0..K-1)")
    return len(task.label_names)
