"""Classification tasks built from the Yelp control-code data (../shared/data/yelp: dev.csv and
test.csv, columns text,label1,label2), written as CSV files for `data.task=csv`:

    OUT/stars/{train,val,test}.csv      review -> stars (5 classes)
    OUT/category/{train,val,test}.csv   review -> business category (10 classes)
    OUT/pair/{train,val,test}.csv       (review, category name) -> does the review belong to it? (2 classes)

train and val are a seeded 90/10 split of dev.csv (val is for choosing a recipe; the reported numbers
are on test, which nothing is chosen on); test is test.csv. The pair task pairs each review with its
own category or, with probability 1/2, another one drawn uniformly (seeded): balanced by construction.
Prints the label_names to give each task. Usage: python bench/yelp_tasks.py [YELP_DIR] [OUT]
"""

from __future__ import annotations

import csv
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dist_dpc.data.labels import YELP_LABELS  # noqa: E402

PAIR_LABELS = ["mismatch", "match"]


def read(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def write(path: Path, rows: list[dict], fields: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)


def pair_rows(rows: list[dict], rng: random.Random) -> list[dict]:
    categories = [c.split(": ", 1)[1] for c in YELP_LABELS["label1"]]
    out = []
    for r in rows:
        own = r["label1"].split(": ", 1)[1]
        if rng.random() < 0.5:
            out.append({"text": r["text"], "category": own, "label": "match"})
        else:
            other = rng.choice([c for c in categories if c != own])
            out.append({"text": r["text"], "category": other, "label": "mismatch"})
    return out


def main() -> None:
    yelp = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT.parent / "shared" / "data" / "yelp"
    out = Path(sys.argv[2]) if len(sys.argv) > 2 else ROOT / "runs" / "yelp_tasks"
    dev, test = read(yelp / "dev.csv"), read(yelp / "test.csv")
    order = list(range(len(dev)))
    random.Random(0).shuffle(order)
    cut = len(dev) // 10
    splits = {"train": [dev[i] for i in sorted(order[cut:])], "val": [dev[i] for i in sorted(order[:cut])],
              "test": test}
    for name, rows in splits.items():
        write(out / "stars" / f"{name}.csv", [{"text": r["text"], "label": r["label2"]} for r in rows],
              ["text", "label"])
        write(out / "category" / f"{name}.csv", [{"text": r["text"], "label": r["label1"]} for r in rows],
              ["text", "label"])
        write(out / "pair" / f"{name}.csv", pair_rows(rows, random.Random(f"pair:{name}")),
              ["text", "category", "label"])
    print(f"wrote {out}: train {len(splits['train'])}, val {len(splits['val'])}, test {len(test)} per task")
    print("stars:    data.label_names=" + repr(YELP_LABELS["label2"]))
    print("category: data.label_names=" + repr(YELP_LABELS["label1"]))
    print(f"pair:     data.text_pair_column=category data.label_names={PAIR_LABELS!r}")


if __name__ == "__main__":
    main()
