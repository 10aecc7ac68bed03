"""Validation splits for SST-2 carved from its training file, so that a recipe choice never looks at
SST-2's dev set (the split docs/RESULTS.md reports on). Written as CSV files for `data.task=csv`:

    OUT/train.csv      the bench's training set: the seeded subset that `data.task=sst2
                       data.max_train_samples=20000` trains on (checked against the loader)
    OUT/val.csv        5,000 other training entries drawn at random (minus any text also in train.csv)
    OUT/val_long.csv   3,000 other training entries of at least 15 words (minus texts in train.csv)

SST-2's training file holds every phrase of its parse trees, most of them a few words long; its dev
set holds whole sentences (mean 19.5 words). val.csv is that phrase mix, on which every model scores
higher and the teacher-student gaps shrink; val_long.csv is the dev-like one (whole sentences and long
phrases). Both are drawn from the 47,349 entries outside the training subset, which no run trains on.
Usage: python bench/sst2_val.py [GLUE_DIR] [OUT]
"""

from __future__ import annotations

import csv
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dist_dpc.data import load_task  # noqa: E402
from dist_dpc.data.config import DataConfig  # noqa: E402

TRAIN_SIZE = 20_000   # bench/recipe_results.sh sst2: data.max_train_samples
VAL_SIZE, VAL_SEED = 5_000, 1234
LONG_SIZE, LONG_WORDS, LONG_SEED = 3_000, 15, 99


def write(path: Path, texts: list[str], labels: list[int]) -> None:
    with open(path, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["text", "label"])
        out.writerows(zip(texts, labels))


def main(glue_dir: str = "../shared/data/glue", out_dir: str = "runs/sst2_val") -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = DataConfig(task="sst2", data_dir=glue_dir, max_length=48, max_train_samples=TRAIN_SIZE)
    full = load_task(DataConfig(task="sst2", data_dir=glue_dir, max_length=48)).train
    # The loader's own subset rule (dist_dpc.data.loading.subset), re-derived and checked below.
    keep = sorted(random.Random(cfg.seed).sample(range(len(full.texts)), TRAIN_SIZE))
    bench_train = load_task(cfg).train
    if list(bench_train.texts) != [full.texts[i] for i in keep]:
        raise SystemExit("the loader's training subset changed: update this carve (dist_dpc.data.loading.subset)")
    write(out / "train.csv", [full.texts[i] for i in keep], [int(full.labels[i]) for i in keep])

    seen = set(bench_train.texts)
    kept = set(keep)
    rest = [i for i in range(len(full.texts)) if i not in kept]
    val = [i for i in sorted(random.Random(VAL_SEED).sample(rest, VAL_SIZE)) if full.texts[i] not in seen]
    write(out / "val.csv", [full.texts[i] for i in val], [int(full.labels[i]) for i in val])

    long = [i for i in rest if len(full.texts[i].split()) >= LONG_WORDS and full.texts[i] not in seen]
    random.Random(LONG_SEED).shuffle(long)
    long = long[:LONG_SIZE]
    write(out / "val_long.csv", [full.texts[i] for i in long], [int(full.labels[i]) for i in long])
    print(f"{out}: train {len(keep)}, val {len(val)}, val_long {len(long)} (positive "
          f"{sum(int(full.labels[i]) for i in long) / len(long):.3f})")


if __name__ == "__main__":
    main(*sys.argv[1:])
