"""Markdown table of one task's rows written by bench/recipe_results.sh (docs/RESULTS.md)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROWS = [  # label, run tree, phase
    ("standard non-private fine-tune (lr 5e-5, batch 32, 2 epochs)", "standard", "teacher"),
    ("the recipe, non-private", "recipe", "teacher"),
    ("DP teacher (epsilon 2 of 4)", "dp", "teacher"),
    ("DPKD student (3 layers)", "dp", "distill"),
    ("structured DPIMP (6 -> 3 layers)", "structured", "prune"),
    ("unstructured DPIMP (50 %)", "unstructured", "prune"),
    ("2:4 DPIMP", "two-four", "prune"),
]


def main(out: str) -> None:
    root = Path(out)
    print("| model | test accuracy | vs DP teacher | non-zero params | epsilon (delta) | phase minutes |")
    print("|---|---:|---:|---:|---|---:|")
    teacher = None
    for label, tree, phase in ROWS:
        eval_file = root / tree / "eval" / "results.json"
        if not eval_file.is_file():
            print(f"| {label} | (not run) | | | | |")
            continue
        row = {r["phase"]: r for r in json.loads(eval_file.read_text())["models"]}.get(phase)
        if row is None:
            print(f"| {label} | (not run) | | | | |")
            continue
        acc = next(iter(row["metrics"].values()))["accuracy"] * 100
        if (tree, phase) == ("dp", "teacher"):
            teacher = acc
        trained = json.loads((root / tree / phase / "results.json").read_text())
        eps = "none (not private)" if not trained["private"] else f"{trained['epsilon']:.2f} ({trained['delta']:.2g})"
        gap = f"{acc - teacher:+.2f}" if teacher is not None and (tree, phase) != ("dp", "teacher") and \
            trained["private"] else ""
        # The whole phase where recorded (head_init, the teacher pass, every pruning round), else its DP-SGD steps.
        minutes = (trained.get("phase_seconds") or trained.get("train_seconds") or 0) / 60
        print(f"| {label} | {acc:.2f} % | {gap} | {row['nonzero_parameters'] / 1e6:.2f} M | {eps} | {minutes:.0f} |")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/recipe")
