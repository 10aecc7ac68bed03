"""Data loaders on the real SST-2 and Yelp files, on GLUE-format pair tasks, generic files and errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dist_dpc.data import DataConfig, check_labels, collate, load_task, resolve_num_labels, tokenize_split

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data"
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason=f"real data not found at {SHARED}")


@needs_shared
def test_real_sst2():
    data = load_task(DataConfig(task="sst2", data_dir=str(SHARED / "glue")))
    assert (len(data.train), len(data.eval["validation"])) == (67349, 872)
    assert data.label_names == ["negative", "positive"] and not data.is_pair
    positive = sum(data.train.labels) / len(data.train)
    assert 0.5 < positive < 0.6  # SST-2 train is 55.8 % positive
    assert all(t.strip() for t in data.train.texts[:1000])
    assert "charming and often affecting journey" in data.eval["validation"].texts[0]


@needs_shared
@pytest.mark.parametrize("column, count", [("label1", 10), ("label2", 5)])
def test_real_yelp(column, count):
    data = load_task(DataConfig(task="yelp", data_dir=str(SHARED / "yelp"), label_column=column))
    assert len(data.train) == 5000 and len(data.eval["validation"]) == 5000
    assert len(data.label_names) == count
    prefix = "Business Category: " if column == "label1" else "Review Stars: "
    assert all(name.startswith(prefix) for name in data.label_names)
    assert set(data.train.labels) == set(range(count))


@needs_shared
def test_real_sst2_subset_is_seeded():
    cfg = dict(task="sst2", data_dir=str(SHARED / "glue"), max_train_samples=500)
    a, b = load_task(DataConfig(**cfg, seed=1)), load_task(DataConfig(**cfg, seed=1))
    c = load_task(DataConfig(**cfg, seed=2))
    assert a.train.texts == b.train.texts and a.train.texts != c.train.texts and len(a.train) == 500


def write_tsv(path: Path, header: list[str], rows: list[list[str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join("\t".join(r) for r in [header] + rows) + "\n")


def test_glue_pair_tasks_from_original_tsv(tmp_path):
    write_tsv(tmp_path / "QNLI" / "train.tsv", ["index", "question", "sentence", "label"],
              [["0", "Who?", "Him.", "entailment"], ["1", "Where?", "Nowhere \"quoted", "not_entailment"]])
    write_tsv(tmp_path / "QNLI" / "dev.tsv", ["index", "question", "sentence", "label"], [["0", "Q", "S", "not_entailment"]])
    qnli = load_task(DataConfig(task="qnli", data_dir=str(tmp_path)))
    assert qnli.is_pair and qnli.train.text_pairs == ["Him.", "Nowhere \"quoted"] and qnli.train.labels == [0, 1]
    header = ["index", "promptID", "pairID", "genre", "sentence1_binary_parse", "sentence2_binary_parse",
              "sentence1_parse", "sentence2_parse", "sentence1", "sentence2", "label1", "gold_label"]
    row = lambda s1, s2, y: ["0", "1", "2", "fiction", "(", "(", "(", "(", s1, s2, y, y]  # noqa: E731
    write_tsv(tmp_path / "MNLI" / "train.tsv", header, [row("A", "B", "neutral"), row("C", "D", "contradiction")])
    write_tsv(tmp_path / "MNLI" / "dev_matched.tsv", header, [row("E", "F", "entailment")])
    write_tsv(tmp_path / "MNLI" / "dev_mismatched.tsv", header, [row("G", "H", "contradiction")])
    mnli = load_task(DataConfig(task="mnli", data_dir=str(tmp_path / "MNLI")))
    assert mnli.label_names == ["entailment", "neutral", "contradiction"] and mnli.train.labels == [1, 2]
    assert set(mnli.eval) == {"validation_matched", "validation_mismatched"}
    assert mnli.eval["validation_mismatched"].labels == [2]
    write_tsv(tmp_path / "QQP" / "train.tsv", ["id", "qid1", "qid2", "question1", "question2", "is_duplicate"],
              [["0", "1", "2", "a?", "b?", "1"], ["1", "3", "4", "broken row"], ["2", "5", "6", "c?", "d?", "0"]])
    write_tsv(tmp_path / "QQP" / "dev.tsv", ["id", "qid1", "qid2", "question1", "question2", "is_duplicate"],
              [["0", "1", "2", "e?", "f?", "0"]])
    with pytest.warns(UserWarning, match="skipped 1 malformed"):
        qqp = load_task(DataConfig(task="qqp", data_dir=str(tmp_path)))
    assert qqp.train.labels == [1, 0] and qqp.label_names == ["not_duplicate", "duplicate"]


def write_rows(path: Path, rows: list[dict]) -> Path:
    if path.suffix == ".jsonl":
        path.write_text("\n".join(json.dumps(r) for r in rows))
    else:
        sep = "\t" if path.suffix == ".tsv" else ","
        path.write_text("\n".join(sep.join(str(v) for v in r.values()) if i else sep.join(r)
                                  for i, r in enumerate([rows[0]] + rows)))
    return path


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl"])
def test_generic_files(tmp_path, suffix):
    rows = [{"review": "fine", "other": "x", "sentiment": "pos"}, {"review": "meh", "other": "y", "sentiment": "neg"}]
    path = write_rows(tmp_path / f"train{suffix}", rows)
    held_out = write_rows(tmp_path / f"dev{suffix}", [{"review": "ok", "other": "z", "sentiment": "neg"}])
    data = load_task(DataConfig(task="csv", train_file=str(path), eval_file=str(held_out), text_column="review",
                                text_pair_column="other", label_column="sentiment", label_names=["neg", "pos"]))
    assert data.label_names == ["neg", "pos"] and data.train.labels == [1, 0] and data.train.text_pairs == ["x", "y"]
    assert data.eval["validation"].labels == [0]


def test_label_schema_comes_from_the_config_not_the_private_labels(tmp_path):
    # The training file holds two of the three configured classes (and one row by index): the head
    # and id2label have three, in the configured order, whatever the data holds.
    train = write_rows(tmp_path / "train.csv", [{"text": "a", "label": "pos"}, {"text": "b", "label": "neg"},
                                                {"text": "c", "label": "1"}])
    dev = write_rows(tmp_path / "dev.csv", [{"text": "d", "label": "neutral"}])
    data = load_task(DataConfig(task="csv", train_file=str(train), eval_file=str(dev),
                                label_names=["neg", "pos", "neutral"]))
    assert data.label_names == ["neg", "pos", "neutral"] and data.num_labels == 3
    assert data.train.labels == [1, 0, 1] and data.eval["validation"].labels == [2]
    assert resolve_num_labels(data, None) == 3 and resolve_num_labels(data, 4) == 4
    # A head smaller than the label schema would never predict some classes: refused, with the fix.
    with pytest.raises(ValueError, match=r"model.num_labels=2 is smaller than the task's 3 classes.*num_labels=3"):
        resolve_num_labels(data, 2)

    # A private label outside the schema is refused; the message names the field, never the value.
    secret = write_rows(tmp_path / "secret.csv", [{"text": "a", "label": "pos"}, {"text": "b", "label": "s3cr3t"}])
    with pytest.raises(ValueError, match="data.label_names") as err:
        load_task(DataConfig(task="csv", train_file=str(secret), label_names=["neg", "pos"]))
    assert "s3cr3t" not in str(err.value)
    # String labels without a schema: no names are made up from the data.
    with pytest.raises(ValueError, match="set data.label_names to the class names") as err:
        load_task(DataConfig(task="csv", train_file=str(secret)))
    assert "s3cr3t" not in str(err.value) and "pos" not in str(err.value)
    # An evaluation label outside the schema may be shown: the evaluation split is not protected.
    odd = write_rows(tmp_path / "odd.csv", [{"text": "e", "label": "maybe"}])
    with pytest.raises(ValueError, match=r"maybe.*data.label_names"):
        load_task(DataConfig(task="csv", train_file=str(train), eval_file=str(odd), label_names=["neg", "pos"]))

    # Integer labels without data.label_names: the class count is model.num_labels, not max(label) + 1.
    ints = write_rows(tmp_path / "ints.csv", [{"text": "a", "label": 0}, {"text": "b", "label": 3}])
    data = load_task(DataConfig(task="csv", train_file=str(ints)))
    assert data.label_names is None and data.num_labels is None
    with pytest.raises(ValueError, match="Set data.label_names .* or model.num_labels"):
        resolve_num_labels(data, None)
    assert resolve_num_labels(data, 5) == 5
    with pytest.raises(ValueError, match="train split has labels outside \\[0, 3\\).*model.num_labels") as err:
        check_labels(data.train, 3)
    assert "[3]" not in str(err.value)
    # Tasks with a published schema refuse a configured one.
    with pytest.raises(ValueError, match="data.label_names is set for data.task='sst2'"):
        DataConfig(task="sst2", label_names=["a", "b"])


def test_evaluation_file_overlapping_the_training_file_is_refused(tmp_path):
    train = write_rows(tmp_path / "train.csv", [{"text": f"row {i}", "label": i % 2} for i in range(20)])
    with pytest.raises(ValueError, match="data.eval_file: the evaluation file .*train.csv' is the training file"):
        load_task(DataConfig(task="csv", train_file=str(train), eval_file=str(tmp_path / "." / "train.csv")))
    # Two rows shared, labels differing: refused, naming both files but not how many or which rows.
    dev = write_rows(tmp_path / "dev.csv", [{"text": "fresh", "label": 0}, {"text": " row 3 ", "label": 0},
                                            {"text": "row 7", "label": 1}])
    with pytest.raises(ValueError, match="dev.csv' shares rows .* with the training file .*train.csv'") as err:
        load_task(DataConfig(task="csv", train_file=str(train), eval_file=str(dev)))
    assert not any(c.isdigit() for c in str(err.value).replace(str(tmp_path), ""))
    disjoint = write_rows(tmp_path / "ok.csv", [{"text": "fresh", "label": 0}, {"text": "row 3 again", "label": 1}])
    assert len(load_task(DataConfig(task="csv", train_file=str(train), eval_file=str(disjoint))).eval["validation"]) == 2
    # GLUE's dev files are checked against train.tsv too (pairs compared as pairs).
    write_tsv(tmp_path / "QNLI" / "train.tsv", ["index", "question", "sentence", "label"],
              [["0", "Who?", "Him.", "entailment"], ["1", "Where?", "There.", "not_entailment"]])
    write_tsv(tmp_path / "QNLI" / "dev.tsv", ["index", "question", "sentence", "label"],
              [["0", "Who?", "There.", "entailment"]])
    assert len(load_task(DataConfig(task="qnli", data_dir=str(tmp_path))).eval["validation"]) == 1
    write_tsv(tmp_path / "QNLI" / "dev.tsv", ["index", "question", "sentence", "label"],
              [["0", "Where?", "There.", "entailment"]])
    with pytest.raises(ValueError, match="data.data_dir: the evaluation file .*dev.tsv' shares rows"):
        load_task(DataConfig(task="qnli", data_dir=str(tmp_path)))


def test_errors_name_the_field(tmp_path):
    with pytest.raises(FileNotFoundError, match="data.train_file"):
        load_task(DataConfig(task="csv", train_file=str(tmp_path / "missing.csv")))
    (tmp_path / "t.csv").write_text("text,label\nhi,0\n")
    with pytest.raises(ValueError, match=r"no column 'sentence'.*columns are: text, label"):
        load_task(DataConfig(task="csv", train_file=str(tmp_path / "t.csv"), text_column="sentence"))
    (tmp_path / "empty.csv").write_text("text,label\n")
    with pytest.raises(ValueError, match="empty"):
        load_task(DataConfig(task="csv", train_file=str(tmp_path / "empty.csv")))
    with pytest.raises(FileNotFoundError, match="SST-2/train.tsv"):
        load_task(DataConfig(task="sst2", data_dir=str(tmp_path)))
    with pytest.raises(ValueError, match="data.task='imdb' is invalid: allowed values are synthetic_sentiment"):
        DataConfig(task="imdb")


def test_glue_without_data_dir_offline_says_how_to_fix(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match=r"Pass data.data_dir=/path/to/glue \(the directory holding SST-2/"):
        load_task(DataConfig(task="sst2"))


def test_synthetic_set_is_deterministic_balanced_and_announced():
    a, b = load_task(DataConfig()), load_task(DataConfig())
    assert a.train.texts == b.train.texts and len(a.train) == 2000 and len(a.eval["validation"]) == 500
    assert 0.45 < sum(a.train.labels) / len(a.train) < 0.55
    assert "generated" in a.source and "not real data" in a.source
    assert any(" not " in t for t, y in zip(a.train.texts, a.train.labels) if y == 0)


@pytest.fixture(scope="module")
def tokenizer():
    from dist_dpc.models import ModelConfig, load_tokenizer

    return load_tokenizer(ModelConfig(name="minilm"))


def test_tokenize_cache_and_collate(tmp_path, tokenizer, monkeypatch):
    split = load_task(DataConfig(synthetic_size=40)).train
    data = tokenize_split(split, tokenizer, 16, cache_dir=tmp_path)
    assert len(data) == 40 and all(len(x) <= 16 for x in data.input_ids)
    assert [p.name for p in tmp_path.iterdir()][0].startswith("train-")

    def refuse(*a, **k):
        raise AssertionError("the second call must read the cache")

    monkeypatch.setattr(type(tokenizer), "__call__", refuse)
    again = tokenize_split(split, tokenizer, 16, cache_dir=tmp_path)
    assert again.input_ids == data.input_ids
    batch = collate([data[i] for i in range(3)], tokenizer.pad_token_id, num_rows=5)
    assert batch["input_ids"].shape[0] == 5 and batch["input_ids"].shape[1] % 8 == 0
    assert batch["sample_mask"].tolist() == [1, 1, 1, 0, 0]
    assert batch["attention_mask"][3:].sum(1).tolist() == [1, 1]
    assert batch["labels"][:3].tolist() == split.labels[:3]


def test_check_labels():
    data = load_task(DataConfig(synthetic_size=40))
    check_labels(data.train, 2)
    # The training split's values stay out of the message; the evaluation split's are shown.
    with pytest.raises(ValueError, match=r"train split has labels outside \[0, 1\).*set data.label_names / "
                                         r"model.num_labels to the task's full label schema"):
        check_labels(data.train, 1)
    with pytest.raises(ValueError, match=r"validation split has labels \[1\] outside \[0, 1\)"):
        check_labels(data.eval["validation"], 1)
